"""A signal to `amptrain train --nproc 2` reaches every worker: SIGTERM and SIGINT are passed on
(the workers checkpoint and stop), and SIGKILL, which cannot be, ends them too (the launcher's
child is told when its parent dies). No worker trains on as an orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from processes import alive, descendants

ARGS = ["--nproc", "2", "--device", "cpu", "--layers", "2", "--width", "16", "--heads", "2",
        "--context", "16", "--batch-size", "4", "--precision", "fp32", "--no-progress",
        "--checkpoint-every", "5", "--max-steps", "5000", "--no-compile"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="/proc and the parent-death signal")
@pytest.mark.parametrize("sent, code, strategy", [
    (signal.SIGTERM, 143, "ddp"), (signal.SIGKILL, -9, "ddp"), (signal.SIGINT, 130, "ddp"),
    (signal.SIGTERM, 143, "fsdp"),
])  # fmt: skip
def test_a_signal_to_the_launcher_stops_every_worker_with_a_checkpoint(
    sent, code, strategy, tmp_path, corpus
):
    log = (tmp_path / "log.txt").open("w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "amptrain", "train", "--data", str(corpus), "--out", "runs", *ARGS,
         "--strategy", strategy],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    below: set[int] = set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob("runs/*/checkpoints/step-*")):
            time.sleep(0.2)
        below = descendants(launcher.pid)
        assert len(below) >= 3  # torch's agent and two workers
        os.kill(launcher.pid, sent)
        assert launcher.wait(timeout=60) == code
        deadline = time.time() + 60
        while time.time() < deadline and alive(below):
            time.sleep(0.2)
        assert alive(below) == set()  # no orphan trains on
    finally:
        for pid in alive(below | descendants(launcher.pid)):
            os.kill(pid, signal.SIGKILL)
    said = (tmp_path / "log.txt").read_text()
    told = "SIGINT" if sent == signal.SIGINT else "SIGTERM"  # SIGKILL: the parent-death signal
    assert f"amptrain: stopped by {told} after step" in said and "checkpoint saved" in said
    assert "Traceback" not in said, said
