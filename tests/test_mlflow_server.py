"""`amptrain train --mlflow URL` against a real MLflow server: the password of the URL is never
printed or written, and a server that freezes or dies never holds a training step or a signal
for more than a few seconds; its failure is one warning and a record in summary.json."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="mlflow server needs flask and flask-cors"),
]

PASSWORD = "se@cret-Pw0rd-42"  # an unencoded `@` too
ARGS = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size", "4",
        "--precision", "fp32", "--no-compile", "--no-progress", "--log-every", "1",
        "--out", "runs"]  # fmt: skip


@pytest.fixture
def server():
    running = MlflowServer().start()
    yield running
    running.stop()


def _train(tmp_path: Path, uri: str, *extra: str) -> subprocess.Popen:
    log = (tmp_path / "log.txt").open("wb")
    command = [sys.executable, "-m", "amptrain", "train", "--mlflow", uri, *ARGS, *extra]
    return subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)


class StepWatch:
    """Polls the run's metrics.jsonl: the longest wait between two new records."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.lines, self.last, self.longest = tmp_path, 0, time.monotonic(), 0.0

    def poll(self) -> int:
        files = list(self.tmp_path.glob("runs/*/metrics.jsonl"))
        lines = files[0].read_bytes().count(b"\n") if files else 0
        now = time.monotonic()
        if lines > self.lines:
            self.lines, self.last = lines, now
        self.longest = max(self.longest, now - self.last)
        return lines

    def until(self, lines: int, process: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.poll() < lines and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.lines >= lines, tmp_path_log(self.tmp_path)

    def during(self, seconds: float, process: subprocess.Popen) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and process.poll() is None:
            self.poll()
            time.sleep(0.05)


def tmp_path_log(tmp_path: Path) -> str:
    """The end of the run's output, for an assertion's message."""
    return whole_log(tmp_path)[-3000:]


def whole_log(tmp_path: Path) -> str:
    """Everything the run printed, its whitespace made single spaces: the console wraps a
    warning where its length puts it (a server's error text varies), and the run's summary
    table can push it out of the last lines."""
    return " ".join((tmp_path / "log.txt").read_text(errors="replace").split())


def _until_the_server_has_metrics(server: MlflowServer, process: subprocess.Popen) -> None:
    """Wait until the run's metrics reach the server, so the call the freeze holds is a metric
    batch (on a loaded machine the settings can still be on their way after 20 steps)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        runs = client.search_runs(["1"])
        if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
            return
        time.sleep(0.2)
    raise AssertionError(f"no metric reached the server: {server.log()[-2000:]}")


def test_the_password_of_the_tracking_uri_is_in_no_message_and_no_file(tmp_path, server):
    from mlflow.tracking import MlflowClient

    uri = server.url.replace("http://", f"http://amp:{PASSWORD}@")
    assert _train(tmp_path, uri, "--max-steps", "6", "--eval-every", "3").wait(300) == 0
    said = (tmp_path / "log.txt").read_bytes()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    for secret in (PASSWORD, PASSWORD.replace("@", "%40"), PASSWORD.split("@")[1]):
        assert secret.encode() not in said
        assert [p for p in written if secret.encode() in p.read_bytes()] == []
    # MLflow's own "View run at URL" line is replaced by one with the password hidden
    assert b"http://amp:***@127.0.0.1" in said and b"View run" not in said
    (run,) = MlflowClient(server.url).search_runs(["1"])
    assert [m.step for m in MlflowClient(server.url).get_metric_history(
        run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]  # fmt: skip


def test_a_frozen_server_holds_no_step_and_sigterm_ends_the_run_in_seconds(tmp_path, server):
    process = _train(tmp_path, server.url, "--max-steps", "1000000", "--eval-every", "1000000",
                     "--checkpoint-every", "1000000")  # fmt: skip
    watch = StepWatch(tmp_path)
    try:
        watch.until(20, process)
        _until_the_server_has_metrics(server, process)
        server.freeze()  # accepts connections, never answers
        watch.during(12, process)
        assert process.poll() is None and watch.longest < 10, tmp_path_log(tmp_path)
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143
        assert time.monotonic() - asked < 10
    finally:
        process.kill()
    said = whole_log(tmp_path)  # no answer, or a full queue while waiting for one
    assert len(re.findall(r"MLflow \w+ failed \(", said)) == 1, said
    assert "training continues without MLflow" in said
    assert "stopped by SIGTERM after step" in said and "Traceback" not in said


def test_a_server_that_dies_mid_run_is_one_warning_and_a_record_in_the_summary(tmp_path, server):
    process = _train(tmp_path, server.url, "--max-steps", "400", "--eval-every", "400")
    watch = StepWatch(tmp_path)
    try:
        watch.until(20, process)
        started = time.monotonic()
        server.kill()
        while process.poll() is None and time.monotonic() - started < 120:
            watch.poll()
            time.sleep(0.05)
        assert process.wait(timeout=10) == 0, tmp_path_log(tmp_path)
    finally:
        process.kill()
    assert watch.longest < 10
    (run_dir,) = tmp_path.glob("runs/train-*")
    (failure,) = json.loads((run_dir / "summary.json").read_text())["tracker_failures"]
    assert failure["sink"] == "MLflow" and failure["during"] == "log" and failure["step"] > 0
    said = whole_log(tmp_path)
    assert said.count("training continues without MLflow") == 1 and "Traceback" not in said


def test_sigterm_just_after_the_server_died_ends_the_run_in_seconds(tmp_path, server):
    process = _train(tmp_path, server.url, "--max-steps", "1000000", "--eval-every", "1000000",
                     "--checkpoint-every", "1000000")  # fmt: skip
    watch = StepWatch(tmp_path)
    try:
        watch.until(20, process)
        server.kill()  # the calls queued and the next ones meet a dead server
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143, tmp_path_log(tmp_path)
        assert time.monotonic() - asked < 10
    finally:
        process.kill()
    said = whole_log(tmp_path)
    assert "stopped by SIGTERM after step" in said and "Traceback" not in said


def test_a_closed_port_is_refused_in_seconds_with_no_run_left(tmp_path):
    started = time.monotonic()
    process = _train(tmp_path, "http://127.0.0.1:1", "--max-steps", "2")
    assert process.wait(timeout=120) == 2
    assert time.monotonic() - started < 20
    said = whole_log(tmp_path)
    assert "MLflow could not start" in said and "Traceback" not in said and "Retrying" not in said
    assert not list(tmp_path.glob("runs/train-*"))
