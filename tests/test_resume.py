"""Resume equality (F1), scaler state (F8), NaN after unscale (F11), accumulation (F12), B5."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import pattern_blocks, rewrite_manifest_entry, tiny_model

import amptrain
from amptrain import checkpoint, stepping
from amptrain.capability import Capabilities
from amptrain.checkpoint import CheckpointError
from amptrain.cli import main
from amptrain.config import FitOptions
from amptrain.errors import PrecisionError
from amptrain.optim import lr_factor
from amptrain.precision import resolve

ARGS = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size",
        "4", "--eval-every", "4", "--checkpoint-every", "3", "--dropout", "0.1",
        "--no-progress", "--log-every", "1"]  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(chr(97 + (i * 7) % 26) for i in range(6000)))
    return path


def _sigterm_at(monkeypatch, step):
    """Send this process a real SIGTERM at the end of `step`, from inside the loop."""
    original = stepping.emit

    def emit(callbacks, hook, *args):
        original(callbacks, hook, *args)
        if hook == "on_step_end" and args[0].step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(stepping, "emit", emit)


def _final_state(out):
    (run,) = out.iterdir()
    ckpt = checkpoint.load(checkpoint.latest(run / "checkpoints"))
    return run, ckpt


def assert_bitwise_equal(a, b):
    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from flat(v, f"{prefix}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from flat(v, f"{prefix}/{i}")
        else:
            yield prefix, obj

    left, right = dict(flat(a)), dict(flat(b))
    assert left.keys() == right.keys()
    for key, x in left.items():
        y = right[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        else:
            assert x == y, key


@pytest.mark.parametrize(("seed", "precision"), [(0, "fp32"), (1, "fp32"), (2, "fp32"),
                                                 (3, "bf16")])  # fmt: skip
def test_sigterm_then_resume_equals_an_uninterrupted_run(
    seed, precision, tmp_path, corpus, monkeypatch, capsys
):
    steps = 10
    k = random.Random(seed).randint(2, steps - 2)
    common = ["train", "--data", str(corpus), "--precision", precision, "--seed", str(seed),
              "--max-steps", str(steps), *ARGS]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0

    _sigterm_at(monkeypatch, k)
    assert main([*common, "--out", str(tmp_path / "cut")]) == 143
    err = capsys.readouterr().err
    assert f"SIGTERM after step {k}" in err and "--resume auto" in err
    (run,) = (tmp_path / "cut").iterdir()
    assert checkpoint.latest(run / "checkpoints").name == f"step-{k:09d}"
    monkeypatch.undo()
    # The command as it was, plus --resume (even seeds); or --resume alone (odd seeds).
    again = [*common, "--out", str(tmp_path / "cut"), "--resume", "auto"]
    short = ["train", "--resume", "auto", "--out", str(tmp_path / "cut"), "--no-progress"]
    assert main(again if seed % 2 == 0 else short) == 0

    run_a, a = _final_state(tmp_path / "straight")
    run_b, b = _final_state(tmp_path / "cut")
    assert a.trainer["step"] == b.trainer["step"] == steps
    for part in ("model", "optimizer", "scheduler", "scaler", "rng"):
        assert_bitwise_equal(a.tensors[part], b.tensors[part])
    summary_a = json.loads((run_a / "summary.json").read_text())
    summary_b = json.loads((run_b / "summary.json").read_text())
    for key in ("final_val_loss", "final_train_loss", "initial_val_loss", "best_val_loss"):
        assert summary_a[key] == summary_b[key], key
    lines = (run_b / "metrics.jsonl").read_text().splitlines()
    steps_logged = [json.loads(x)["step"] for x in lines if "train/loss" in x]
    assert steps_logged == list(range(1, steps + 1))  # no repeats, no gaps


@pytest.mark.slow
def test_sigterm_from_outside_exits_143_and_resumes(tmp_path, corpus):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "amptrain", "train", "--data", str(corpus), "--max-steps",
           "100000", "--out", str(out), *ARGS]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*/checkpoints/step-*")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "resume with: amptrain train --resume auto" in err


def test_scaler_state_round_trips_into_a_differently_built_scaler():
    source = resolve("fp16", "cpu")
    scaler = source.scaler
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler._scale.fill_(1024.0)
    scaler._growth_tracker.fill_(7)
    state = source.state_dict()
    for lazy in (True, False):
        target = resolve("fp16", "cpu")
        target.scaler = torch.amp.GradScaler("cpu", init_scale=2.0, growth_factor=3.0,
                                             backoff_factor=0.25, growth_interval=5)  # fmt: skip
        if not lazy:
            target.scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
        target.load_state_dict(state)
        got = target.scaler.state_dict()
        assert got == scaler.state_dict()
        assert got["scale"] == 1024.0 and got["_growth_tracker"] == 7


def test_nan_injected_after_unscale_is_caught_and_params_stay_finite(monkeypatch, train_val):
    model = tiny_model()
    prec = resolve("fp16", "cpu")
    original = prec.unscale_
    calls = []

    def unscale_then_poison(optimizer):
        original(optimizer)
        calls.append(1)
        if len(calls) == 2:
            next(model.parameters()).grad.fill_(math.nan)

    monkeypatch.setattr(prec, "unscale_", unscale_then_poison)
    result = amptrain.fit(model, train_val[0], precision=prec, max_steps=4, batch_size=8)
    assert result.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("accum", [1, 2, 3])
def test_accumulation_with_a_scaler_steps_once_per_window(accum, monkeypatch):
    prec = resolve("fp16", "cpu")
    counts = {"unscale_": 0, "update": 0}  # the optimizer steps itself on the unscaled grads
    for name in counts:
        original = getattr(prec.scaler, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(prec.scaler, name, spy)
    # 10 blocks, batch 4: 2 batches per epoch, fewer than accum=3; 10 is not divisible by 3.
    result = amptrain.fit(tiny_model(), pattern_blocks(10), precision=prec, max_steps=5,
                          batch_size=4, grad_accum=accum)  # fmt: skip
    assert counts == {"unscale_": 5, "update": 5}
    assert result.steps == 5


def _checkpoint_of(tmp_path, precision, **overrides):
    model = tiny_model(**overrides)
    amptrain.fit(model, pattern_blocks(16), precision=precision, max_steps=2, batch_size=4,
                 checkpoint_dir=tmp_path / precision)  # fmt: skip
    return checkpoint.load(checkpoint.latest(tmp_path / precision))


def test_fp16_resume_from_a_bf16_checkpoint_offers_allow_new_scaler(tmp_path):
    ckpt = _checkpoint_of(tmp_path, "bf16")
    with pytest.raises(PrecisionError, match="'fp16' .* differs from 'bf16'.*--allow-new-scaler"):
        amptrain.fit(tiny_model(), pattern_blocks(16), precision="fp16", max_steps=4,
                     batch_size=4, resume=ckpt)  # fmt: skip
    result = amptrain.fit(tiny_model(), pattern_blocks(16), precision="fp16", max_steps=4,
                          batch_size=4, resume=ckpt, allow_new_scaler=True)  # fmt: skip
    assert result.steps == 4 and result.loss_scale == 65536.0


def test_resume_into_a_changed_model_lists_the_differences(tmp_path):
    ckpt = _checkpoint_of(tmp_path, "fp32")
    with pytest.raises(CheckpointError, match=r"shape mismatches \['wte.weight: checkpoint"):
        amptrain.fit(tiny_model(n_embd=32), pattern_blocks(16), precision="fp32", max_steps=4,
                     batch_size=4, resume=ckpt)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.2"):
        amptrain.fit(tiny_model(n_layer=3), pattern_blocks(16), precision="fp32", max_steps=4,
                     batch_size=4, resume=ckpt)  # fmt: skip


def test_missing_path_and_newer_format_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.load(tmp_path / "nowhere")
    ckpt = _checkpoint_of(tmp_path, "fp32")
    trainer = json.loads((ckpt.path / "trainer.json").read_text())
    trainer["format_version"] = checkpoint.FORMAT_VERSION + 1
    payload = json.dumps(trainer).encode()
    (ckpt.path / "trainer.json").write_bytes(payload)
    rewrite_manifest_entry(ckpt.path, "trainer.json")
    with pytest.raises(CheckpointError, match="format version 2.*upgrade amptrain"):
        checkpoint.load(ckpt.path)


def test_resume_refuses_differing_flags_by_name(tmp_path, corpus, capsys):
    common = ["train", "--data", str(corpus), "--max-steps", "2", "--out", str(tmp_path), *ARGS]
    assert main(common) == 0
    code = main([*common, "--lr", "0.1", "--batch-size", "2", "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--lr (the run has 0.001, the command gives 0.1)" in err
    assert "--batch-size (the run has 4, the command gives 2)" in err
    code = main(["train", "--resume", "auto", "--out", str(tmp_path / "empty")])
    assert code == 2 and "no train run under" in capsys.readouterr().err


def test_a_larger_max_steps_extends_a_finished_run(tmp_path, corpus, capsys):
    common = ["train", "--data", str(corpus), "--precision", "fp32", "--out",
              str(tmp_path / "runs"), "--warmup", "0", *ARGS]  # fmt: skip
    assert main([*common, "--max-steps", "4"]) == 0
    assert main([*common, "--max-steps", "3", "--resume", "auto"]) == 2
    assert "can only be extended: give --max-steps 4 or more" in capsys.readouterr().err
    assert main([*common, "--max-steps", "7", "--resume", "auto"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "config.json").read_text())["fit"]["max_steps"] == 7
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["train/lr"] for r in records if "train/lr" in r}
    assert sorted(lrs) == list(range(1, 8))  # no repeats, no gaps
    # The schedule is recomputed for 7 steps: step 5 (index 4) is where a 7-step run has it,
    # above the 4-step run's last learning rate.
    opts = FitOptions(max_steps=7, warmup=0.0)
    assert lrs[5] == pytest.approx(1e-3 * lr_factor(4, opts))
    assert lrs[5] > lrs[4]
    assert checkpoint.latest(run / "checkpoints").name == f"step-{7:09d}"


def test_an_extension_cut_before_its_first_checkpoint_resumes(tmp_path, corpus):
    out = tmp_path / "runs"
    common = ["train", "--data", str(corpus), "--precision", "fp32", "--out", str(out), *ARGS]
    assert main([*common, "--max-steps", "4"]) == 0
    (run,) = out.iterdir()
    # What an extension writes first: config.json with the new total (its checkpoints come later).
    config = json.loads((run / "config.json").read_text())
    config["fit"]["max_steps"] = 6
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", "auto", "--out", str(out), "--no-progress"]) == 0
    assert checkpoint.latest(run / "checkpoints").name == f"step-{6:09d}"


def _files(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


NET = """
from torch import nn

WIDTH = {width}


class Net(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, WIDTH)
        self.head = nn.Linear(WIDTH, vocab_size)

    def forward(self, idx):
        return self.head(self.emb(idx))
"""


def test_a_refused_resume_leaves_every_file_of_the_run_byte_identical(
    tmp_path, corpus, monkeypatch, capsys
):
    monkeypatch.setattr("amptrain.train.MATPLOTLIB_AVAILABLE", False)
    net, out = tmp_path / "net.py", tmp_path / "runs"
    net.write_text(NET.format(width=8))
    common = ["train", "--model", f"{net}:Net", "--data", str(corpus), "--context", "16",
              "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
              "--checkpoint-every", "3", "--precision", "fp32", "--max-steps", "6",
              "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(common) == 0
    (run,) = out.iterdir()
    # The newest checkpoint unreadable: resuming goes back to step 3, past 3 logged steps.
    (run / "checkpoints" / f"step-{6:09d}" / "model.pt").write_bytes(b"cut")
    step3 = run / "checkpoints" / f"step-{3:09d}"
    before = _files(run)
    assert len((run / "metrics.jsonl").read_text().splitlines()) > 6
    net.write_text(NET.format(width=12))  # the model file was edited since
    refusals = {"shape mismatches ['emb.weight: checkpoint [256, 8] vs model [256, 12]'": []}
    refusals["'bf16' (--precision) differs from 'fp32'"] = ["--precision", "bf16"]
    for said, extra in refusals.items():
        capsys.readouterr()
        assert main([*common, "--resume", "auto", *extra]) == 2
        err = capsys.readouterr().err
        assert said in " ".join(err.split()) and "Traceback" not in err
        assert _files(run) == before, said
    net.write_text(NET.format(width=8))
    trainer = json.loads((step3 / "trainer.json").read_text())
    trainer.pop("batch_size")  # as written before checkpoints recorded it: cannot reshard
    (step3 / "trainer.json").write_text(json.dumps({**trainer, "world_size": 2}))
    rewrite_manifest_entry(step3, "trainer.json")
    before = _files(run)
    assert main([*common, "--resume", "auto"]) == 2
    assert "written by 2 process(es) and this run has 1" in capsys.readouterr().err
    assert _files(run) == before


def _capabilities(bf16_tflops):
    return Capabilities("cpu", "a test CPU", (), {"fp32": 1.0, "bf16": bf16_tflops,
                        "fp16": 0.01}, 1, (256, 256, 256), 0.1)  # fmt: skip


def test_a_resume_under_a_slow_probe_keeps_bf16(tmp_path, corpus, fake_probe, capsys):
    out = tmp_path / "runs"
    common = ["train", "--data", str(corpus), "--out", str(out), *ARGS]
    fake_probe(_capabilities(bf16_tflops=3.0))  # bf16 clearly faster: auto takes it
    assert main([*common, "--max-steps", "2"]) == 0
    (run,) = out.iterdir()
    assert json.loads((run / "summary.json").read_text())["precision"] == "bf16"
    fake_probe(_capabilities(bf16_tflops=0.5))  # a busy machine misreads bf16 as slow
    capsys.readouterr()
    assert main([*common, "--max-steps", "3", "--resume", "auto"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["steps"] == 3
    assert summary["reason"].startswith(f"resumed: bf16, the precision step-{2:09d} was")
    assert "auto: bf16, whose matmuls clearly beat fp32's" in summary["reason"]
    assert checkpoint.load(checkpoint.latest(run / "checkpoints")).trainer["precision"] == "bf16"
    # Asked for by name: the same is taken, another refused with both names.
    assert main([*common, "--max-steps", "4", "--resume", "auto", "--precision", "bf16"]) == 0
    capsys.readouterr()
    assert main([*common, "--max-steps", "5", "--resume", "auto", "--precision", "fp32"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "precision 'fp32' (--precision) differs from 'bf16', the precision checkpoint" in line
    assert "give --precision bf16" in line


def test_a_checkpoint_without_config_hash_is_still_checked_for_precision(tmp_path, corpus, capsys):
    out = tmp_path / "runs"
    common = ["train", "--data", str(corpus), "--out", str(out), *ARGS, "--max-steps", "2"]
    assert main([*common, "--precision", "fp16"]) == 0
    (run,) = out.iterdir()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "precision": "bf16"}))
    for step_dir in checkpoint.list_checkpoints(run / "checkpoints"):
        trainer = json.loads((step_dir / "trainer.json").read_text())
        del trainer["config_hash"]
        (step_dir / "trainer.json").write_text(json.dumps(trainer))
        rewrite_manifest_entry(step_dir, "trainer.json")
    capsys.readouterr()
    assert main(["train", "--resume", "auto", "--out", str(out), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "precision 'bf16' (the run's config.json) differs from 'fp16'" in line
    with pytest.raises(PrecisionError, match="'bf16' .* differs from 'fp16'"):
        amptrain.fit(
            tiny_model(),
            pattern_blocks(16),
            precision="bf16",
            max_steps=4,
            batch_size=4,
            resume=checkpoint.load(checkpoint.latest(run / "checkpoints")),
        )
