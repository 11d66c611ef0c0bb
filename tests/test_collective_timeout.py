"""A rank that stops answering (SIGSTOP) under `--nproc 2` turns into one line and exit 3 within
AMPTRAIN_COLLECTIVE_TIMEOUT seconds, instead of torch's backend report after ten minutes; a bad
value of that variable is refused before any process starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import alive, descendants

from amptrain.cli import main

ARGS = ["--nproc", "2", "--device", "cpu", "--layers", "1", "--width", "16", "--heads", "2",
        "--context", "16", "--batch-size", "4", "--precision", "fp32", "--no-progress",
        "--no-compile", "--log-every", "1", "--max-steps", "100000", "--out", "runs"]  # fmt: skip


def _rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e for e in env if e.startswith(b"RANK=")]
    return int(found[0][5:]) if found else None


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_a_rank_that_stops_answering_is_one_line_and_exit_3(tmp_path, corpus):
    log = (tmp_path / "log.txt").open("w")
    env = {**os.environ, "AMPTRAIN_COLLECTIVE_TIMEOUT": "5"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "amptrain", "train", "--data", str(corpus), *ARGS],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = list(tmp_path.glob("runs/*/metrics.jsonl"))
            if metrics and metrics[0].read_bytes().count(b"\n") >= 3:
                break
            assert launcher.poll() is None, (tmp_path / "log.txt").read_text()
            time.sleep(0.1)
        (stopped,) = [p for p in alive(descendants(launcher.pid)) if _rank(p) == 1]
        os.kill(stopped, signal.SIGSTOP)  # alive, holding its sockets, never answering
        started = time.monotonic()
        while b"in vain" not in (tmp_path / "log.txt").read_bytes():
            assert time.monotonic() - started < 60 and launcher.poll() is None
            time.sleep(0.1)
        assert time.monotonic() - started < 30  # 5 s, and the next collective's own wait
        os.kill(stopped, signal.SIGKILL)  # the stuck rank, ended (torch's agent waits 30 s)
        assert launcher.wait(timeout=120) == 3
    finally:
        for pid in alive(descendants(launcher.pid) | ({stopped} if stopped else set())):
            os.kill(pid, signal.SIGKILL)
        launcher.kill()
    said = (tmp_path / "log.txt").read_text()
    lines = [line for line in said.splitlines() if line.startswith("amptrain")]
    assert len(lines) == 1 and "Traceback" not in said, said
    assert "a collective waited for the other processes in vain (limit 5 s" in lines[0]


def test_a_bad_collective_timeout_is_refused_before_any_process(tmp_path, corpus, monkeypatch,
                                                                capsys):  # fmt: skip
    monkeypatch.setenv("AMPTRAIN_COLLECTIVE_TIMEOUT", "soon")
    assert main(["train", "--data", str(corpus), *ARGS[:-2], "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "AMPTRAIN_COLLECTIVE_TIMEOUT='soon' must be a positive number" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("message, lost", [
    # NCCL's watchdog, as torch 2.x words it on a GPU (no GPU here: the text is what is tested)
    ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
     "OpType=ALLREDUCE, Timeout(ms)=600000) ran for 600012 milliseconds before timing out.", True),
    ("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:58014", True),
    ("mat1 and mat2 shapes cannot be multiplied (4x16 and 32x8)", False),
])  # fmt: skip
def test_a_lost_peer_is_told_from_other_runtime_errors(message, lost, monkeypatch):
    from amptrain import distributed
    from amptrain.errors import EnvironmentFailure

    monkeypatch.setenv("WORLD_SIZE", "2")
    found = distributed.peer_lost(RuntimeError(message))
    assert isinstance(found, EnvironmentFailure) if lost else found is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing is a lost peer
    assert distributed.peer_lost(RuntimeError(message)) is None
