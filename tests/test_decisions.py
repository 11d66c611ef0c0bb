"""`auto` on a busy machine: the probe's rounds and spread, and the recorded decision per device."""

from __future__ import annotations

import json
import os

import pytest
import torch

from amptrain import capability, decisions
from amptrain.capability import Capabilities
from amptrain.precision import resolve


def _caps(fp32_rounds, bf16_rounds):
    """A CPU table whose best figures are the best of the given rounds."""
    rounds = {"fp32": tuple(fp32_rounds), "bf16": tuple(bf16_rounds), "fp16": (0.01,) * 3}
    tflops = {p: max(r) for p, r in rounds.items()}
    return Capabilities("cpu", "a busy CPU", (), tflops, 1, (256,) * 3, 0.1, None, rounds)


QUIET_FAST = _caps((1.0, 1.0, 1.0), (3.0, 3.1, 2.9))  # bf16 3x fp32 in every round
QUIET_SLOW = _caps((1.0, 1.0, 1.0), (0.5, 0.5, 0.5))  # bf16 half fp32's speed in every round
# Rounds on both sides of auto's 1.25x: the first says fp32 overall (1.3 / 2.0), the second bf16.
BUSY_SAYS_FP32 = _caps((1.0, 2.0, 1.0), (1.3, 1.3, 1.3))
BUSY_SAYS_BF16 = _caps((1.0, 1.0, 1.0), (1.3, 0.9, 1.0))


@pytest.fixture(autouse=True)
def _empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AMPTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def test_the_probe_times_interleaved_rounds_and_keeps_each():
    caps = capability.measure(torch.device("cpu"), budget_s=0.03)
    assert set(caps.rounds) == set(caps.tflops) == {"fp32", "bf16", "fp16"}
    for name, rounds in caps.rounds.items():
        assert len(rounds) == capability.ROUNDS and all(r > 0 for r in rounds)
        assert caps.tflops[name] == max(rounds)
    table = caps.to_dict()
    assert table["rounds"] == caps.rounds
    assert isinstance(table["unreliable"], dict)


def test_a_spread_across_autos_threshold_is_unreliable():
    assert QUIET_FAST.unreliable("bf16") is None and QUIET_SLOW.unreliable("bf16") is None
    assert BUSY_SAYS_FP32.ratio_range("bf16") == pytest.approx((0.65, 1.3))
    why = BUSY_SAYS_FP32.unreliable("bf16")
    assert "3 rounds put bf16 at 0.65x to 1.30x fp32's" in why and "1.25x" in why
    no_rounds = Capabilities("cpu", "x", (), {"fp32": 1.0, "bf16": 1.3}, 1, (256,) * 3, 0.1)
    assert no_rounds.unreliable("bf16") is None  # nothing to judge it by


def test_an_unreliable_probe_keeps_the_decision_recorded_for_the_device(fake_probe):
    fake_probe(QUIET_FAST)
    first = resolve("auto", "cpu")
    assert first.name == "bf16" and first.warning is None
    saved = json.loads((decisions.cache_dir() / "precision.json").read_text())
    (entry,) = saved.values()
    assert entry["precision"] == "bf16" and entry["reliable"] is True
    fake_probe(BUSY_SAYS_FP32)
    second = resolve("auto", "cpu")
    assert second.name == "bf16"
    assert second.reason.startswith("auto: bf16, as decided for this device on ")
    assert "where this probe is unreliable (its 3 rounds put bf16 at" in second.warning
    assert "would choose fp32; pass --precision fp32" in second.warning


def test_two_identical_fresh_runs_on_a_busy_machine_pick_the_same_precision(fake_probe):
    fake_probe(BUSY_SAYS_FP32)
    first = resolve("auto", "cpu")
    assert first.name == "fp32" and "unreliable: its 3 rounds" in first.reason
    assert "chose fp32 from its best figures and recorded it" in first.warning
    fake_probe(BUSY_SAYS_BF16)  # the next probe, as busy, reads the other way
    second = resolve("auto", "cpu")
    assert second.name == "fp32" and "auto keeps fp32" in second.warning
    saved = json.loads((decisions.cache_dir() / "precision.json").read_text())
    assert [e["reliable"] for e in saved.values()] == [False]


def test_a_reliable_probe_that_decides_otherwise_is_said_and_overruled(fake_probe):
    fake_probe(QUIET_FAST)
    assert resolve("auto", "cpu").name == "bf16"
    fake_probe(QUIET_SLOW)  # consistent rounds, at a busy moment: the first decision stands
    again = resolve("auto", "cpu")
    assert again.name == "bf16"
    assert "auto keeps bf16, decided for this device on" in again.warning
    assert "this probe reads bf16 0.5 TFLOP/s vs fp32 1.0" in again.warning
    assert str(decisions.cache_dir() / "precision.json") in again.warning
    assert resolve("fp32", "cpu").name == "fp32"  # an explicit request is never changed


def test_a_damaged_or_unwritable_record_is_only_a_record_fewer(fake_probe, tmp_path, monkeypatch):
    fake_probe(QUIET_FAST)
    folder = decisions.cache_dir()
    folder.mkdir(parents=True)
    (folder / "precision.json").write_text("{cut")
    assert resolve("auto", "cpu").name == "bf16"
    saved = json.loads((folder / "precision.json").read_text())  # rewritten whole
    (key,) = saved
    saved[key]["precision"] = "tf32"  # edited by hand: auto never takes tf32 on a CPU
    (folder / "precision.json").write_text(json.dumps(saved))
    assert resolve("auto", "cpu").name == "bf16"
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("AMPTRAIN_CACHE_DIR", str(blocked / "cache"))  # cannot be created
    assert resolve("auto", "cpu").name == "bf16"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".precision")]
