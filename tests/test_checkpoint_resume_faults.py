"""Checkpoint load and resume faults (reliability spec F4, F6, F7): corruption, batches, RNG.

A corrupt newest checkpoint is skipped with a warning (or refused by name when asked for
explicitly), and a resumed run continues the same batches and random draws bit for bit.
Faults while saving are in test_checkpoint_faults.py.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    checkpoint_names,
    checkpoint_payload,
    pattern_blocks,
    rewrite_manifest_entry,
    step_name,
    tiny_model,
)

import amptrain
from amptrain import checkpoint, checkpoint_state
from amptrain.callbacks import Callback
from amptrain.checkpoint import CheckpointError
from amptrain.cli import main
from amptrain.config import FitOptions
from amptrain.loop import TrainState
from amptrain.optim import make_optimizer, make_scheduler
from amptrain.precision import resolve

FIT = dict(precision="fp32", batch_size=4, seed=0)


class StopAt(Callback):
    """Ends the run after step `step`, as an interruption would (the loop then checkpoints)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state, metrics) -> None:
        if state.step == self.step:
            state.should_stop = True


# F4 Truncated or corrupt checkpoint ---------------------------------------------------------------


def test_latest_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save(root, step, checkpoint_payload(step), {"step": step})
    model_pt = root / step_name(2) / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:-10])
    logging.getLogger("amptrain").propagate = True
    with caplog.at_level(logging.WARNING, logger="amptrain"):
        assert checkpoint.latest(root) == root / step_name(1)
    (record,) = [r for r in caplog.records if r.name == "amptrain"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert f"checkpoint {step_name(2)} incomplete/corrupt" in message
    assert "model.pt" in message and f"using {step_name(1)}" in message
    with pytest.raises(CheckpointError, match="incomplete or corrupt: model.pt has"):
        checkpoint.load(root / step_name(2))


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = pytest.mark.parametrize(
    "corrupt", [truncate_half, flip_one_byte], ids=["truncated-half", "one-byte-flipped"]
)


def train_with_checkpoints(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A 6-step CLI run checkpointed every 2 steps; returns (out, run_dir)."""
    monkeypatch.setattr("amptrain.train.MATPLOTLIB_AVAILABLE", False)  # loss.png: slow, untested
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox " * 300)
    out = tmp_path / "runs"
    code = main([
        "train", "--data", str(corpus), "--layers", "1", "--width", "16", "--heads", "2",
        "--context", "16", "--batch-size", "4", "--max-steps", "6", "--eval-every", "3",
        "--eval-batches", "2", "--checkpoint-every", "2", "--precision", "fp32",
        "--device", "cpu", "--no-progress", "--out", str(out), "--log-every", "1",
    ])  # fmt: skip
    assert code == 0
    (run_dir,) = out.iterdir()
    assert checkpoint_names(run_dir / "checkpoints") == [step_name(2), step_name(4), step_name(6)]
    return out, run_dir


def train_steps_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "train/loss" in r]


@CORRUPTIONS
def test_resume_auto_falls_back_from_a_corrupt_newest_checkpoint(tmp_path, monkeypatch, capsys,
                                                                  corrupt):  # fmt: skip
    out, run_dir = train_with_checkpoints(tmp_path, monkeypatch)
    corrupt(run_dir / "checkpoints" / step_name(6) / "model.pt")
    capsys.readouterr()
    code = main(["train", "--resume", "auto", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())  # undo the console's line wrapping
    assert code == 0, captured.err
    assert f"checkpoint {step_name(6)} incomplete/corrupt" in text
    assert f"using {step_name(4)}" in text
    assert f"from {step_name(4)} (step 4)" in text
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    assert train_steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]
    assert checkpoint.verify(run_dir / "checkpoints" / step_name(6)) is None  # saved anew


@CORRUPTIONS
def test_explicit_resume_of_a_corrupt_checkpoint_is_refused_by_name(tmp_path, monkeypatch, capsys,
                                                                     corrupt):  # fmt: skip
    out, run_dir = train_with_checkpoints(tmp_path, monkeypatch)
    newest = run_dir / "checkpoints" / step_name(6)
    corrupt(newest / "model.pt")
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    code = main(["train", "--resume", str(newest), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "amptrain: error:" in err
    assert str(newest) in err and "model.pt" in err and "incomplete or corrupt" in err
    assert "PytorchStreamReader" not in err and "Traceback" not in err
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before  # nothing touched


def record_training_inputs(model: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def hook(module, args):
        if module.training:
            seen.append(args[0].detach().clone())

    model.register_forward_pre_hook(hook)
    return seen


def test_mid_epoch_resume_continues_the_same_batches(tmp_path):
    train = pattern_blocks(10)  # batch 4: 2 batches an epoch, so step 3 is in mid-epoch
    steps, k = 6, 3
    fit = {**FIT, "compile": False}  # no compile decision: its timed passes would be recorded
    full = record_training_inputs(model := tiny_model())
    amptrain.fit(model, train, None, max_steps=steps, **fit)
    assert len(full) == steps

    first = record_training_inputs(model := tiny_model())
    amptrain.fit(model, train, None, callbacks=[StopAt(k)], checkpoint_dir=tmp_path,
                 max_steps=steps, **fit)  # fmt: skip
    ckpt = checkpoint.load(tmp_path / step_name(k))
    assert ckpt.trainer["batches"] == k
    second = record_training_inputs(model := tiny_model(seed=7))
    amptrain.fit(model, train, None, resume=ckpt, max_steps=steps, **fit)

    assert (len(first), len(second)) == (k, steps - k)
    assert not torch.equal(full[k], full[0])  # the comparison can tell batches apart
    assert all(torch.equal(a, b) for a, b in zip(full, first + second, strict=True))


# F7 RNG restore ---------------------------------------------------------------------------------


def peek_draws(n: int = 100) -> tuple[list[float], list[float], torch.Tensor]:
    """The next `n` draws of python, numpy and torch, leaving the generators where they were."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    draws = [random.random() for _ in range(n)], np.random.random_sample(n).tolist(), torch.rand(n)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    return draws


def same_draws(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


class Draws(Callback):
    def __init__(self, at_step: int | None = None) -> None:
        self.at_step, self.start, self.at, self.end = at_step, None, None, None

    def on_fit_start(self, state) -> None:
        self.start = peek_draws()

    def on_step_end(self, state, metrics) -> None:
        if state.step == self.at_step:
            self.at = peek_draws()

    def on_fit_end(self, state) -> None:
        self.end = peek_draws()


def seed_host_generators(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)


def test_resume_restores_every_generator_and_repeats_dropout(tmp_path):
    train, steps, k = pattern_blocks(10), 6, 3
    seed_host_generators(1)
    full = Draws(at_step=k)
    amptrain.fit(reference := tiny_model(dropout=0.1), train, None, callbacks=[full],
                 max_steps=steps, **FIT)  # fmt: skip
    assert not torch.equal(full.at[2], full.start[2])  # dropout drew from the torch generator

    seed_host_generators(1)
    amptrain.fit(tiny_model(dropout=0.1), train, None, callbacks=[StopAt(k)],
                 checkpoint_dir=tmp_path, max_steps=steps, **FIT)  # fmt: skip
    ckpt = checkpoint.load(tmp_path / step_name(k))
    seed_host_generators(99)  # a new process starts from other generator states
    torch.manual_seed(99)
    resumed = Draws()
    amptrain.fit(model := tiny_model(seed=5, dropout=0.1), train, None, callbacks=[resumed],
                 resume=ckpt, max_steps=steps, **FIT)  # fmt: skip

    assert same_draws(resumed.start, full.at)  # right after the restore, as at step k
    assert same_draws(resumed.end, full.end)  # and still in step at the end
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[name]) for name, v in model.state_dict().items())


def generator_states(rng: dict) -> list[dict]:
    """The generator dicts in rng.pt: one per rank (`{"ranks": [...]}`) or a single one."""
    return rng.get("ranks", [rng])


@pytest.mark.parametrize("source", ["python", "numpy", "torch"])
def test_rng_file_lacking_a_source_refuses_to_resume(tmp_path, source):
    train = pattern_blocks(10)
    amptrain.fit(tiny_model(), train, None, checkpoint_dir=tmp_path, max_steps=2, **FIT)
    path = tmp_path / step_name(2)
    rng = torch.load(path / "rng.pt", weights_only=True)
    for generators in generator_states(rng):
        del generators[source]
    torch.save(rng, path / "rng.pt")
    rewrite_manifest_entry(path, "rng.pt")
    ckpt = checkpoint.load(path)  # the files match the manifest: only the content is short
    assert all(source not in g for g in generator_states(ckpt.tensors["rng"]))

    model = tiny_model()
    opts = FitOptions(max_steps=4, batch_size=4)
    optimizer = make_optimizer(model, opts)
    scheduler = make_scheduler(optimizer, opts)
    with pytest.raises(CheckpointError, match=rf"rng\.pt.*{source}"):
        checkpoint_state.restore(ckpt, model, optimizer, scheduler,
                                 resolve("fp32", torch.device("cpu")), TrainState())  # fmt: skip
    with pytest.raises(CheckpointError, match=r"rng\.pt"):
        amptrain.fit(tiny_model(), train, None, resume=ckpt, max_steps=4, **FIT)
