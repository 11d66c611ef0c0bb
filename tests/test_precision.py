from __future__ import annotations

import pytest
import torch

from amptrain import capability
from amptrain import precision as P
from amptrain.capability import Capabilities
from amptrain.errors import PrecisionError


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("32-true", "fp32"),
        ("fp32", "fp32"),
        ("16-mixed", "fp16"),
        ("bf16-mixed", "bf16"),
        ("BF16", "bf16"),
        ("tf32", "tf32"),
        ("auto", "auto"),
    ],
)
def test_aliases_map_to_one_vocabulary(alias, name):
    assert P.normalize(alias) == name


@pytest.mark.parametrize("bad", ["16", "fp8", "half", "bf16-true", "float64"])
def test_unknown_precision_lists_valid_values(bad):
    with pytest.raises(PrecisionError) as err:
        P.resolve(bad, "cpu")
    message = str(err.value)
    assert repr(bad) in message
    for valid in ("fp32", "fp16", "bf16", "tf32", "auto", "bf16-mixed"):
        assert valid in message


def test_auto_on_this_machine_follows_its_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("AMPTRAIN_CACHE_DIR", str(tmp_path))  # no decision recorded before
    chosen = P.resolve("auto", "cpu")
    assert chosen.name == ("bf16" if capability.probe("cpu").clearly_faster("bf16") else "fp32")
    assert chosen.reason.startswith("auto:") and "TFLOP/s" in chosen.reason


def test_explicit_fp16_on_cpu_is_honoured_with_a_real_scaler():
    chosen = P.resolve("fp16", "cpu")
    assert chosen.name == "fp16"
    assert chosen.scaler.is_enabled()
    assert chosen.loss_scale == 65536.0
    assert "GradScaler('cpu')" in chosen.reason


def test_tf32_on_cpu_is_refused_with_alternatives():
    with pytest.raises(PrecisionError, match="tf32.*'fp32' or 'bf16'"):
        P.resolve("tf32", "cpu")


def test_bf16_on_a_pre_ampere_gpu_is_refused(monkeypatch, fake_probe):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_probe(Capabilities("cuda", "Tesla T4", ("sm_75",), {"fp32": 8.0, "fp16": 65.0,
               "bf16": 0.5, "tf32": 8.0}, 1, (4096,) * 3, 0.1, (7, 5)))  # fmt: skip
    with pytest.raises(PrecisionError, match="Tesla T4.*fp16"):
        P.resolve("bf16", "cuda")
    assert P.resolve("auto", "cuda").name == "fp16"


def test_bf16_on_a_cpu_that_emulates_it_is_served_with_a_warning(fake_probe):
    fake_probe(Capabilities("cpu", "old CPU", (), {"fp32": 0.05, "bf16": 0.004, "fp16": 0.001},
                            1, (256,) * 3, 0.1))  # fmt: skip
    chosen = P.resolve("bf16", "cpu")
    assert chosen.name == "bf16"
    assert "emulated" in chosen.warning and "bf16 0.004 TFLOP/s vs fp32 0.05" in chosen.reason


def test_bf16_autocast_really_runs_matmuls_in_bf16_and_fp32_does_nothing():
    a = torch.randn(4, 4)
    with P.resolve("bf16", "cpu").autocast():
        assert (a @ a).dtype == torch.bfloat16
    with P.resolve("fp32", "cpu").autocast():
        assert (a @ a).dtype == torch.float32
    assert not P.resolve("fp32", "cpu").scaler.is_enabled()
    assert P.resolve("bf16", "cpu").loss_scale == 1.0


def test_scaler_state_always_has_one_shape():
    for name in ("fp32", "bf16", "fp16"):
        state = P.resolve(name, "cpu").state_dict()
        assert state["name"] == name
        assert state["enabled"] == (name == "fp16")


def test_cuda_precision_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PrecisionError, match="CUDA is not available.*'cpu'"):
        P.resolve("fp16", "cuda")
