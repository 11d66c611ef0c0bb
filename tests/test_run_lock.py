"""One process per run: a second one is refused in one line and changes nothing, and the lock
goes with the process that held it, however it ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from amptrain.cli import main
from amptrain.runs import lock

ARGS = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size", "4",
        "--precision", "fp32", "--no-progress", "--checkpoint-every", "5", "--max-steps", "600",
        "--no-compile"]  # fmt: skip


def _files(run):
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_second_process_on_a_run_is_refused_and_a_crash_releases_the_lock(
    tmp_path, corpus, capsys
):
    out = tmp_path / "runs"
    first = subprocess.Popen([sys.executable, "-m", "amptrain", "train", "--data", str(corpus),
                              "--out", str(out), *ARGS], stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("*/checkpoints/step-*")):
            time.sleep(0.1)
        (run,) = out.iterdir()
        assert (run / lock.OWNER_FILE).read_text().startswith(f"pid {first.pid} on ")
        os.kill(first.pid, signal.SIGSTOP)  # held still while the second one tries
        before = _files(run)
        assert main(["train", "--resume", "auto", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if line.startswith("amptrain:")]
        assert len(said) == 1 and f"is being trained by pid {first.pid}" in said[0]
        assert _files(run) == before  # not a byte of the run changed
    finally:
        first.kill()  # a crash: no handler runs, the kernel releases the lock
        first.wait()
    assert main(["train", "--resume", "auto", "--out", str(out), "--no-progress"]) == 0
    assert not (run / lock.OWNER_FILE).exists()  # released with the run's last file


def test_the_lock_is_one_holder_at_a_time(tmp_path):
    held = lock.acquire(tmp_path)
    held.announce()
    with pytest.raises(lock.RunInUseError, match=f"pid {os.getpid()}"):
        lock.acquire(tmp_path)  # another open file description: refused even in one process
    held.release()
    lock.acquire(tmp_path).release()
