"""F19: every storage kind ends with the same outputs; S8: fixed modes under any umask."""

from __future__ import annotations

import csv
import json
import logging
import os
import stat

import pytest

optuna = pytest.importorskip("optuna")

from amptrain.cli import main  # noqa: E402
from amptrain.errors import ConfigError  # noqa: E402
from amptrain.search import report as search_plot  # noqa: E402
from amptrain.search.journal import open_journal  # noqa: E402


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 120)
    return path


def _search(corpus, space, out, *extra):
    return main(["search", "--data", str(corpus), "--context", "16", "--layers", "1", "--width",
                 "8", "--heads", "2", "--batch-size", "4", "--eval-batches", "1", "--precision",
                 "fp32", "--no-progress", "--out", str(out), "--trials", "2", "--budget-steps",
                 "2", "--space", str(space),
                 "--study-name", "s", *extra])  # fmt: skip


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"lr": [0.001, 0.01]}))
    return path


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr(search_plot, "MATPLOTLIB_AVAILABLE", False)  # plots: tests/test_search.py


@pytest.fixture
def loose_umask():
    old = os.umask(0)  # the loosest umask: every mode amptrain gets is the one it asked for
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_every_storage_writes_best_json_and_trials_csv(tmp_path, corpus, space, kind, capsys):
    out = tmp_path / "runs"
    db = tmp_path / "db" / "study.db"
    extra = ["--storage", f"sqlite:///{db}"] if kind == "sqlite" else []
    assert _search(corpus, space, out, *extra) == 0, capsys.readouterr().err
    run = out / "search-s"
    best = json.loads((run / "best.json").read_text())
    assert best["n_trials"] == 2 and best["value"] is not None
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    assert (run / "journal.log").exists() == (kind == "journal")
    if kind == "sqlite":
        assert db.stat().st_size > 0  # the study lives in the database


@pytest.mark.slow
def test_a_search_under_a_loose_umask_creates_private_files(tmp_path, corpus, space, loose_umask):
    out = tmp_path / "runs"
    db = tmp_path / "db" / "study.db"
    assert _search(corpus, space, out / "journal") == 0
    assert _search(corpus, space, out / "sqlite", "--storage", f"sqlite:///{db}") == 0
    for folder in (out, out / "journal", out / "journal" / "search-s", out / "sqlite" / "search-s",
                   db.parent):  # fmt: skip
        assert _mode(folder) == 0o755, folder
    assert _mode(out / "journal" / "search-s" / "journal.log") == 0o600
    assert _mode(db) == 0o600
    for name in ("best.json", "trials.csv", "config.json"):
        assert _mode(out / "sqlite" / "search-s" / name) == 0o644


def test_a_train_run_under_a_loose_umask_has_fixed_modes(tmp_path, corpus, loose_umask):
    out = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--context", "16", "--layers", "1", "--width",
                 "8", "--heads", "2", "--batch-size", "4", "--max-steps", "1", "--eval-batches",
                 "1", "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    (run,) = out.iterdir()
    for path in [out, *run.rglob("*")]:
        mode = _mode(path)
        if path.is_dir():
            assert mode in (0o755, 0o700), (path, oct(mode))
        else:
            assert mode in (0o644, 0o600), (path, oct(mode))


def _journal_study(path, trials):
    """A study of `trials` quick trials in the journal at `path`, through `open_journal`."""
    study = optuna.create_study(storage=open_journal(path), study_name="s", load_if_exists=True)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=trials)
    return study


def test_a_journal_cut_in_its_last_record_is_backed_up_cut_and_resumed(tmp_path, caplog):
    path = tmp_path / "journal.log"
    _journal_study(path, 2)
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])  # a worker killed while appending its last record
    logging.getLogger("amptrain").propagate = True
    with caplog.at_level(logging.WARNING, logger="amptrain"):
        study = _journal_study(path, 1)
    (backup,) = tmp_path.glob("journal.log.*.bak")
    assert backup.read_bytes() == whole[:-20]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "amptrain"]
    assert str(path) in warning and "cut by an interrupted write" in warning
    assert str(backup) in warning
    assert len(study.trials) == 3
    assert len(_journal_study(path, 1).trials) == 4  # and the journal stays readable


def test_a_damaged_journal_is_named_with_its_line_and_how_to_recover(tmp_path, corpus, space,
                                                                      capsys):  # fmt: skip
    path = tmp_path / "journal.log"
    _journal_study(path, 1)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:2], b"{garbage\n", *lines[2:]]))
    before = path.read_bytes()
    out = tmp_path / "runs"
    assert _search(corpus, space, out, "--storage", str(path)) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("amptrain:")]
    assert f"search journal {path} is damaged at line 3 (JSONDecodeError" in line
    assert f"head -n 2 {path} > {path}.fixed" in line and "Traceback" not in err
    assert path.read_bytes() == before and not out.exists()
    record = json.loads(lines[1])
    path.write_bytes(b"".join([*lines[:2], json.dumps({**record, "op_code": 99}).encode() + b"\n",
                               *lines[2:]]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"damaged at line 3 .*op_code 99 is none of optuna's"):
        open_journal(path)  # optuna's replay would stop at an AssertionError
    assert _search(corpus, space, out, "--storage", str(path)) == 2  # and from the command
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("amptrain:")]
    assert "damaged at line 3" in line and "op_code 99" in line and "Traceback" not in err
    assert not out.exists()
    path.write_bytes(b"not a journal at all")  # another file given by mistake: never cut
    with pytest.raises(ConfigError, match="damaged at line 1 .*not a journal record"):
        open_journal(path)
    assert path.read_bytes() == b"not a journal at all"
