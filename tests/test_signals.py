"""F18: a signal at any moment ends with the newest completed step checkpointed, and resumes.

Each moment is held open in a child `amptrain train` (a wrapper pauses there and says so in a
marker file); this process then sends the child a real SIGTERM and checks what it left: exit
143, a checkpoint of the newest completed step, and `--resume auto` ending bit for bit where an
uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_resume import assert_bitwise_equal

from amptrain import checkpoint, stepping
from amptrain.cli import main

STEPS = 8
ARGS = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size",
        "4", "--eval-every", "4", "--checkpoint-every", "3", "--dropout", "0.1",
        "--max-steps", str(STEPS), "--no-progress", "--log-every", "1",
        # the reference run and the child measure `auto` attention in separate processes, and
        # under load the two measurements can differ; the resumed run keeps its child's choice
        "--attention", "default"]  # fmt: skip

# moment -> (what to hold open, which call of it, the step the checkpoint must hold)
MOMENTS = {
    "training step": ("amptrain.stepping.train_step", 5, 5),  # the 5th step finishes, then stops
    "evaluation": ("amptrain.stepping.evaluate", 2, 4),  # the evaluation after step 4 is cut
    "checkpoint write": ("amptrain.checkpoint.write_file", 1, 3),  # the save of step 3 completes
    # step 6's metrics (8th record) are written; metrics.jsonl is the first sink of a run
    "logging": ("amptrain.metrics.sinks.JsonlSink.log", 8, 6),
    "plotting": ("amptrain.runs.plotting.plot_training", 1, STEPS),  # after the run's last step
}

CHILD = """
import importlib, sys, time
from pathlib import Path
import torch
from amptrain.cli import main

torch.set_num_threads(1)  # as in this process (conftest), so the runs agree bit for bit

target, nth, mark, argv = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
parts = target.split(".")  # a module's function, or a method of one of its classes
for split in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module
    try:
        owner = importlib.import_module(".".join(parts[:split]))
        break
    except ModuleNotFoundError:
        continue
for name in parts[split:-1]:
    owner = getattr(owner, name)
attr = parts[-1]
real, calls = getattr(owner, attr), []

def held(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        mark.write_text("here")
        deadline = time.time() + 120
        while not mark.with_suffix(".sent").exists() and time.time() < deadline:
            time.sleep(0.02)  # the signal's handler runs here, as it would inside real work
    return real(*args, **kwargs)

setattr(owner, attr, held)
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("signals") / "corpus.txt"
    path.write_text("".join(chr(97 + (i * 7) % 26) for i in range(6000)))
    return path


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test thread setting
    try:
        assert main(["train", "--data", str(corpus), "--out", str(out), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    (run,) = out.iterdir()
    return run


def _timeless(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "mem/"))} for r in records]


def _interrupt_at(target: str, nth: int, argv: list[str], mark) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", CHILD, target, str(nth), str(mark), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert mark.exists(), proc.communicate(timeout=60)
    os.kill(proc.pid, signal.SIGTERM)
    mark.with_suffix(".sent").write_text("sent")
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("moment", MOMENTS)
def test_sigterm_at_any_moment_checkpoints_the_newest_step_and_resumes_exactly(
    moment, corpus, straight, tmp_path
):
    target, nth, step = MOMENTS[moment]
    out = tmp_path / "runs"
    argv = ["train", "--data", str(corpus), "--out", str(out), *ARGS]
    done = _interrupt_at(target, nth, argv, tmp_path / "mark")
    assert done.returncode == 143, done.stderr
    assert f"stopped by SIGTERM after step {step}" in done.stderr
    assert "resume with: amptrain train --resume auto" in done.stderr
    assert "Traceback" not in done.stderr
    (run,) = out.iterdir()
    newest = checkpoint.latest(run / "checkpoints")
    assert newest.name == f"step-{step:09d}"
    assert not list((run / "checkpoints").glob(".tmp-*"))

    assert main(["train", "--resume", "auto", "--out", str(out), "--no-progress"]) == 0
    a = checkpoint.load(checkpoint.latest(straight / "checkpoints"))
    b = checkpoint.load(checkpoint.latest(run / "checkpoints"))
    assert a.trainer["step"] == b.trainer["step"] == STEPS
    for part in ("model", "optimizer", "scheduler", "scaler"):
        assert_bitwise_equal(a.tensors[part], b.tensors[part])
    # Across processes only torch's generator is comparable: Python's and NumPy's, which
    # amptrain never draws from, move with whatever a process imports (test_resume.py compares
    # them too, within one process).
    torch_rng = [r["torch"] for r in a.tensors["rng"]["ranks"]]
    assert all(torch.equal(x, r["torch"]) for x, r in zip(torch_rng, b.tensors["rng"]["ranks"]))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert _timeless(records) == _timeless(expected)  # every step and evaluation once, same values
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["final_val_loss"]
        == json.loads((straight / "summary.json").read_text())["final_val_loss"]
    )


@pytest.mark.parametrize(("nth", "step"), [(1, 0), (2, 4)])
def test_a_signal_during_evaluation_saves_the_step_and_owes_the_evaluation(
    corpus, tmp_path, monkeypatch, capsys, nth, step
):
    """In-process and quick: the handler cuts the evaluation at once, not at its end.

    The first evaluation (before step 1) is cut too: a step-0 checkpoint then owes it.
    """
    real, calls = stepping.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # a long evaluation; the signal cuts it short
            raise AssertionError("the evaluation was not cut short")
        return real(*args, **kwargs)

    monkeypatch.setattr(stepping, "evaluate", evaluate)
    out = tmp_path / "runs"
    start = time.monotonic()
    assert main(["train", "--data", str(corpus), "--out", str(out), *ARGS]) == 143
    assert time.monotonic() - start < 25
    assert f"SIGTERM after step {step}" in capsys.readouterr().err
    (run,) = out.iterdir()
    ckpt = checkpoint.load(checkpoint.latest(run / "checkpoints"))
    assert ckpt.trainer["step"] == step and ckpt.trainer["eval_pending"] is True
    monkeypatch.undo()
    assert main(["train", "--resume", "auto", "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/loss" in r] == [0, 4, 8]
