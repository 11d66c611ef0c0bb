"""`amptrain search --workers 2` ends with its main process: SIGTERM is passed on to the workers
(exit 143 in one line), SIGKILL ends them too (they are told when their parent dies), and a worker
killed on its own, or a PostgreSQL server killed mid-search, is one line and exit 3, never an
exit 0 short of --trials. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import alive, descendants

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="/proc and the parent-death signal"),
]


def _search(
    tmp_path: Path, corpus: Path, *extra: str, trials: int = 40, steps: int = 20_000
) -> subprocess.Popen:
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": [0.001, 0.01]}))
    command = [sys.executable, "-m", "amptrain", "search", "--data", str(corpus), "--context",
               "16", "--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "4",
               "--eval-batches", "1", "--precision", "fp32", "--no-progress", "--no-compile",
               "--out", "runs", "--space", str(space), "--study-name", "s", "--trials", str(trials),
               "--budget-steps", str(steps), "--workers", "2", *extra]  # fmt: skip
    log = (tmp_path / "log.txt").open("w")
    return subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)


def _workers(search: subprocess.Popen, tmp_path: Path) -> set[int]:
    """The two worker processes (not multiprocessing's resource tracker), once both run trials."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert search.poll() is None, (tmp_path / "log.txt").read_text()
        workers = {pid for pid in alive(descendants(search.pid)) if _is_worker(pid)}
        journal = list(tmp_path.glob("runs/search-s/journal.log"))
        started = journal and journal[0].read_bytes().count(b'"op_code":4') >= 2  # two trials
        if len(workers) == 2 and started:
            return workers
        time.sleep(0.2)
    raise AssertionError("the workers never started trials")


def _is_worker(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in command and b"resource_tracker" not in command


def _said(tmp_path: Path) -> tuple[list[str], str]:
    text = (tmp_path / "log.txt").read_text()
    return [line for line in text.splitlines() if line.startswith("amptrain:")], text


@pytest.mark.parametrize("sent, code", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_signal_to_the_search_ends_every_worker(sent, code, tmp_path, corpus):
    search = _search(tmp_path, corpus)
    workers: set[int] = set()
    try:
        workers = _workers(search, tmp_path)
        os.kill(search.pid, sent)
        assert search.wait(timeout=60) == code
        deadline = time.monotonic() + 30
        while alive(workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(workers) == set()  # no worker runs trials on as an orphan
    finally:
        for pid in alive(workers | descendants(search.pid)):
            os.kill(pid, signal.SIGKILL)
    if sent == signal.SIGTERM:
        lines, text = _said(tmp_path)
        assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], text
        assert "Traceback" not in text


def test_a_worker_killed_on_its_own_fails_the_search_in_one_line(tmp_path, corpus):
    search = _search(tmp_path, corpus, trials=4, steps=2000)  # the other worker ends soon
    try:
        victim = min(_workers(search, tmp_path))
        os.kill(victim, signal.SIGKILL)  # as the out-of-memory killer would
        assert search.wait(timeout=300) == 3
    finally:
        search.kill()
    lines, text = _said(tmp_path)
    assert lines == [line for line in lines if "search workers ended" in line] and len(lines) == 1
    assert "1 of 2 search workers ended before their trials were done (by SIGKILL)" in lines[0]
    assert "Traceback" not in text


def test_postgresql_killed_mid_search_is_one_line(tmp_path, corpus):
    from pg_server import PASSWORD, PgServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries here")
    server = PgServer(bindir).start()
    try:
        url = server.url()
        search = _search(tmp_path, corpus, "--storage", url, trials=4)
        try:
            deadline = time.monotonic() + 120
            while (
                time.monotonic() < deadline
                and search.poll() is None
                and len({pid for pid in alive(descendants(search.pid)) if _is_worker(pid)}) < 2
            ):
                time.sleep(0.2)
            time.sleep(8)  # the workers run trials
            server.stop()  # the database goes away mid-search
            assert search.wait(timeout=120) == 3
        finally:
            search.kill()
    finally:
        server.stop()
    lines, text = _said(tmp_path)
    assert "Traceback" not in text and PASSWORD not in text, text
    assert len(lines) == 1 and "failed during the search" in text, text


def test_workers_that_cannot_reach_the_storage_send_their_reason_and_print_nothing(capfd):
    from amptrain.config import TrainConfig
    from amptrain.search import SearchJob
    from amptrain.search.workers import spawn_workers

    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'amptrain[search]'")
    job = SearchJob(base=TrainConfig(), dims={}, device="cpu", n_trials=2, budget_steps=1,
                    budget_tokens=None, block_targets=1, eval_blocks=1, objectives=("val_loss",),
                    pruner=None, seed=0, storage="postgresql://amp:Pw-9xyz@127.0.0.1:1/db",
                    study_name="s", catch=())  # fmt: skip
    failed = spawn_workers(job, 2, 2, tick=lambda: None)  # the database went away after start
    assert failed is not None and "2 of 2 search workers ended" in failed, failed
    assert "worker 1: cannot open the study storage" in failed or "worker 2" in failed, failed
    err = capfd.readouterr().err
    assert "Traceback" not in err and "amptrain:" not in err and "Pw-9xyz" not in err, err
