"""W&B around a run's life: a resumed run continues its W&B run by id; a killed run leaves no
W&B service behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from test_exit_codes import signal_at_step_end  # noqa: E402
from test_wandb import wandb_env  # noqa: E402, F401

from amptrain import stepping  # noqa: E402
from amptrain.cli import main  # noqa: E402

ARGS = ["--max-steps", "3", "--batch-size", "4", "--context", "16", "--layers", "1",
        "--width", "16", "--heads", "2", "--eval-every", "3", "--eval-batches", "1",
        "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_resume_with_wandb_continues_the_same_wandb_run(wandb_env, monkeypatch):  # noqa: F811
    out, real_emit = wandb_env / "runs", stepping.emit
    signal_at_step_end(monkeypatch, 1, signal.SIGTERM)
    assert main(["train", "--wandb", "resume-test", "--out", str(out), *ARGS]) == 143
    monkeypatch.setattr(stepping, "emit", real_emit)  # not undo(): W&B's settings must stay
    (run,) = out.glob("train-*")
    run_id = json.loads((run / "wandb.json").read_text())["run_id"]
    assert main(["train", "--resume", "auto", "--wandb", "resume-test", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads((run / "wandb.json").read_text())["run_id"] == run_id
    offline = [p.name for p in (out / "wandb").glob("offline-run-*") if not p.is_symlink()]
    # Both folders carry the run's id; W&B adds "-1" to the second when both start in one second.
    assert len(offline) == 2 and all(f"-{run_id}" in name for name in offline), offline


def _services_of(pid: int) -> list[int]:
    """W&B service processes started for process `pid` (wandb-core ... --pid PID)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--pid" in argv and argv[argv.index(b"--pid") + 1 : argv.index(b"--pid") + 2] == [
            str(pid).encode()
        ]:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_a_killed_wandb_run_leaves_no_wandb_service_behind(wandb_env):  # noqa: F811
    out = wandb_env / "runs"
    corpus = wandb_env / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    cmd = [sys.executable, "-m", "amptrain", "train", "--wandb", "kill-test", "--data",
           str(corpus), "--out", str(out), *ARGS, "--max-steps", "100000"]  # fmt: skip
    # Not this process's W&B service (an earlier test's): the child must start its own.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list(out.glob("train-*/metrics.jsonl")):
            time.sleep(0.2)
        assert _services_of(child.pid), "the run did not start a W&B service"
    finally:
        child.kill()  # SIGKILL: the run gets no chance to shut W&B down itself
        child.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and _services_of(child.pid):
        time.sleep(0.2)
    assert _services_of(child.pid) == []
