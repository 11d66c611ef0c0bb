"""Distributed search on a real PostgreSQL server: many workers, a killed worker, two commands.

The server is the session's throwaway one (`pg_server` in conftest); every test gets its own
database. Without the server binaries or the driver these tests skip with that reason.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_model
from pg_server import PASSWORD

optuna = pytest.importorskip("optuna")

from test_search import QUICK, SPACE  # noqa: E402

from amptrain.cli import main  # noqa: E402
from amptrain.errors import ConfigError  # noqa: E402
from amptrain.search import search  # noqa: E402
from amptrain.search.study import STALE, counted  # noqa: E402

TESTS = Path(__file__).parent
BEAT = dict(heartbeat_interval=1, grace_period=2)


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url)


def _no_lock_trouble(server) -> None:
    log = server.log().lower()
    assert not [w for w in ("deadlock", "lock timeout", "could not obtain lock") if w in log]


@pytest.mark.slow
def test_four_workers_finish_exactly_forty_trials(pg_server, pg_url, train_val, caplog):
    factory = functools.partial(tiny_model, seed=0)  # picklable for the spawned workers
    with caplog.at_level(logging.WARNING, logger="amptrain"):
        result = search(factory, *train_val, SPACE, n_trials=40, storage=pg_url, study_name="four",
                        workers=4, pruner="none", **QUICK)  # fmt: skip
    trials = _study(pg_url, "four").trials
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(40)) and result.n_trials == 40
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") and counted(t) for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 4
    _no_lock_trouble(pg_server)


# Worker A, as on another machine: trial 0 trains, trial 1 hangs until A is SIGKILLed. The
# factory is named like the test's own so both commands run the same study settings.
WORKER_A = """
import sys, time
sys.path.insert(0, {tests!r})
import conftest
from amptrain.search import search
calls = 0
def tiny_model():
    global calls
    calls += 1  # call 1 is search's probe of the device, call 2 is trial 0
    if calls == 3:
        time.sleep(600)
    return conftest.tiny_model()
search(tiny_model, conftest.pattern_blocks(48), conftest.pattern_blocks(16, seed=1), {space!r},
       n_trials=3, storage={url!r}, study_name="k", pruner="none", **{beat!r}, **{quick!r})
"""


def _wait_for_running_trial(url: str, proc: subprocess.Popen, number: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker A ended early ({proc.returncode})"
        try:
            trials = _study(url, "k").trials
        except KeyError:  # the study is not created yet
            trials = []
        running = [t for t in trials if t.state.name == "RUNNING" and t.number == number]
        attrs = running[0].user_attrs if running else {}
        # "config" is set once the trial's parameters are sampled, just before the model is built
        if attrs.get("worker", "").endswith(f":{proc.pid}") and "config" in attrs:
            return
        time.sleep(0.2)
    raise AssertionError(f"trial {number} never ran in worker A")


@pytest.mark.slow
def test_a_killed_worker_trial_fails_by_heartbeat_and_is_retried_once(pg_url, train_val):
    script = WORKER_A.format(tests=str(TESTS), space=SPACE, url=pg_url, beat=BEAT, quick=QUICK)
    worker_a = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        _wait_for_running_trial(pg_url, worker_a, number=1)
        os.kill(worker_a.pid, signal.SIGKILL)
    finally:
        worker_a.kill()
        worker_a.wait()
    time.sleep(BEAT["grace_period"] + 1)  # A's last heartbeat is now older than the grace period
    result = search(tiny_model, *train_val, SPACE, n_trials=3, storage=pg_url, study_name="k",
                    pruner="none", **BEAT, **QUICK)  # fmt: skip
    by_number = {t.number: t for t in result.trials}
    assert [by_number[n].state for n in range(4)] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    dead, retry = by_number[1], by_number[2]
    assert dead.reason == STALE and not dead.counted
    assert retry.retry_of == 1 and retry.params == dead.params
    assert [t.number for t in result.trials if t.retry_of is not None] == [2]  # retried once
    assert result.n_trials == 3 == sum(t.counted for t in result.trials)
    assert not [t for t in _study(pg_url, "k").trials if t.state.name in ("RUNNING", "WAITING")]


def _search_command(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["search", "--data", str(corpus), "--context", "32", "--layers", "1", "--width", "16",
            "--heads", "2", "--batch-size", "8", "--eval-batches", "2", "--precision", "fp32",
            "--no-progress", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.slow
def test_two_commands_finish_one_study_together(pg_url, corpus, tmp_path):
    env = {**os.environ, "AMPTRAIN_TEST_DB": pg_url}
    flags = ["--storage", "env:AMPTRAIN_TEST_DB", "--study-name", "shared", "--trials", "12",
             "--budget-steps", "2", "--workers", "2"]  # fmt: skip
    outs = [tmp_path / "machine-a", tmp_path / "machine-b"]
    commands = [[sys.executable, "-m", "amptrain", *_search_command(c, o, *flags)]
                for c, o in ((corpus, out) for out in outs)]  # fmt: skip
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for command in commands]  # fmt: skip
    printed = [proc.communicate(timeout=400) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], printed
    trials = _study(pg_url, "shared").trials
    n_counted = sum(counted(t) for t in trials)
    # Each process stops once the study is full, so it may finish one trial too many.
    assert 12 <= n_counted <= 12 + 3, [(t.number, t.state.name) for t in trials]
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert len({t.user_attrs["worker"] for t in trials}) >= 3, "both commands ran trials"
    written = [p.read_bytes() for out in outs for p in out.rglob("*") if p.is_file()]
    assert all((out / "search-shared" / "best.json").exists() for out in outs)
    assert not any(PASSWORD.encode() in b for b in written)
    assert not any(PASSWORD in out + err for out, err in printed)


def _one_line_error(capsys, url: str, corpus: Path, out: Path, monkeypatch) -> str:
    monkeypatch.setenv("AMPTRAIN_TEST_DB", url)
    code = main(_search_command(corpus, out, "--storage", "env:AMPTRAIN_TEST_DB"))
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize(
    "secret",
    ["Wr0ng-PW-xyz", "Wr0ng@PW-xyz/3"],  # the second with an unencoded @ and /
)
@pytest.mark.parametrize(
    "case, prefix, expected",
    [("malformed", "{url} is not a valid database URL", "the form is postgresql://user:password@"),
     ("unreachable", "cannot open the study storage {url}: ", "Connection refused"),
     ("wrong password", "cannot open the study storage {url}: ",
      'password authentication failed for user "amptrain"')],
)  # fmt: skip
def test_storage_errors_are_one_line_with_the_password_hidden(
    case, prefix, expected, secret, request, corpus, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'amptrain[search]'")
    if case == "wrong password":
        url = request.getfixturevalue("pg_server").url("postgres", password=secret)
    else:
        port = "notaport" if case == "malformed" else "1"
        url = f"postgresql://amptrain:{secret}@127.0.0.1:{port}/db"
    line = _one_line_error(capsys, url, corpus, tmp_path / "runs", monkeypatch)
    shown = url.replace(secret, "***")
    assert line.startswith(f"amptrain: error: {prefix.format(url=shown)}")
    assert expected in line and secret not in line
    assert not any(piece in line for piece in ("Wr0ng", "PW-xyz")), line


def test_the_heartbeat_settings_are_checked_before_any_trial(train_val):
    with pytest.raises(
        ConfigError, match="grace_period=2 must be longer than heartbeat_interval=5"
    ):
        search(
            tiny_model, *train_val, SPACE, n_trials=1, heartbeat_interval=5, grace_period=2, **QUICK
        )
    with pytest.raises(ConfigError, match="heartbeat_interval=0 is invalid"):
        search(tiny_model, *train_val, SPACE, n_trials=1, heartbeat_interval=0, **QUICK)
