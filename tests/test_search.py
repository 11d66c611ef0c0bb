from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import math
import shlex
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import pattern_blocks, tiny_model

optuna = pytest.importorskip("optuna")

from amptrain.cli import main  # noqa: E402
from amptrain.config import FitOptions, TrainConfig  # noqa: E402
from amptrain.errors import ConfigError, PrecisionError  # noqa: E402
from amptrain.optim import lr_factor  # noqa: E402
from amptrain.search import redact, report, search  # noqa: E402
from amptrain.search import space as search_space  # noqa: E402

MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
QUICK = dict(steps=2, batch_size=8, eval_batches=2, baseline=False)
SPACE = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "batch_size": [8]}


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def data():
    return pattern_blocks(48), pattern_blocks(16, seed=1)


class DeterministicPruner(optuna.pruners.BasePruner):
    def __init__(self, prune: bool) -> None:
        self.answer = prune

    def prune(self, study, trial) -> bool:
        return self.answer


class Calls:
    """A model factory that does something else on given calls (call 1 is search's probe)."""

    def __init__(self, action, on=(3,)):
        self.action, self.on, self.n = action, on, 0

    def __call__(self):
        self.n += 1
        if self.n in self.on:
            return self.action()
        return tiny_model()


def boom():
    raise RuntimeError("boom")


def interrupt():
    raise KeyboardInterrupt


def nan_model():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.fill_(math.nan)
    return model


@pytest.mark.parametrize("prune", [True, False])
def test_a_deterministic_pruner_decides_the_state(data, prune):
    result = search(tiny_model, *data, SPACE, n_trials=1, pruner=DeterministicPruner(prune),
                    **QUICK)  # fmt: skip
    (trial,) = result.trials
    assert trial.intermediate, "the objective reported intermediate values"
    if prune:
        assert trial.state == "PRUNED"
        assert trial.value == trial.intermediate[min(trial.intermediate)]
        assert trial.reason.startswith("pruned at step 1/2: val loss")
        assert result.best_value is None
    else:
        assert trial.state == "COMPLETE" and trial.reason is None
        assert trial.value == trial.intermediate[max(trial.intermediate)]
        assert result.best_value == trial.value


def test_every_share_of_the_budget_is_reported_once(data):
    # 10 steps evaluate every 3 steps and at the end: shares 1, 2, 4 (3.6 rounds up) and 4.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = search(tiny_model, *data, SPACE, n_trials=1, pruner="none",
                        **{**QUICK, "steps": 10})  # fmt: skip
    assert sorted(result.trials[0].intermediate) == [1, 2, 4]
    assert not [w for w in caught if "already reported" in str(w.message)]


def test_a_nan_trial_is_fail_with_its_reason(data):
    result = search(Calls(nan_model, on=(2,)), *data, SPACE, n_trials=2, **QUICK)
    nan, fine = result.trials
    assert nan.state == "FAIL" and nan.value is None and nan.counted
    assert nan.reason.startswith("non-finite objective (nan,)")
    assert "steps skipped" in nan.reason  # the storm of skipped steps stopped it first
    assert fine.state == "COMPLETE" and result.best_number == fine.number


@pytest.mark.parametrize(
    ("options", "reason"),
    [({}, "unstable: 1 of 1 steps skipped"), ({"max_nonfinite": 1}, "unstable: 1 consecutive")],
)
def test_an_fp16_overflow_storm_is_pruned_with_its_reason(data, options, reason):
    # A loss scale of 2**100 overflows every fp16 backward; the weights stay finite.
    result = search(tiny_model, *data, {**SPACE, "precision": ["fp16"]}, n_trials=1,
                    init_scale=2.0**100, **options, **QUICK)  # fmt: skip
    (trial,) = result.trials
    assert trial.state == "PRUNED"
    assert trial.reason.startswith(reason)


def test_a_raising_trial_does_not_stop_the_study(data):
    result = search(Calls(boom), *data, SPACE, n_trials=3, **QUICK)
    assert [t.state for t in result.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert result.trials[1].reason == "RuntimeError: boom"
    assert result.n_trials == 3


def test_an_interrupted_study_resumes_to_exactly_n_trials(tmp_path, data):
    journal = str(tmp_path / "journal.log")
    with pytest.raises(KeyboardInterrupt):
        search(Calls(interrupt, on=(4,)), *data, SPACE, n_trials=4, storage=journal,
               study_name="s", **QUICK)  # fmt: skip
    study = optuna.load_study(study_name="s", storage=_journal(journal))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    resumed = Calls(interrupt, on=())  # the same factory (by name) as the interrupted run
    result = search(resumed, *data, SPACE, n_trials=4, storage=journal, study_name="s", **QUICK)
    assert result.n_trials == 4
    assert [t.number for t in result.trials] == [0, 1, 2, 3, 4]
    interrupted = result.trials[2]
    assert not interrupted.counted and interrupted.reason.startswith("interrupted")
    assert all(
        t.counted and t.state in ("COMPLETE", "PRUNED") for t in result.trials if t.number != 2
    )
    again = search(resumed, *data, SPACE, n_trials=4, storage=journal, study_name="s", **QUICK)
    assert len(again.trials) == 5, "a finished study runs no more trials"


def test_a_trial_whose_worker_died_is_failed_and_replaced(tmp_path, data):
    journal = str(tmp_path / "journal.log")
    search(tiny_model, *data, SPACE, n_trials=1, storage=journal, study_name="s", **QUICK)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    study = optuna.load_study(study_name="s", storage=_journal(journal))
    orphan = study.ask()  # left RUNNING, as by a worker killed with SIGKILL
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{dead}")
    result = search(tiny_model, *data, SPACE, n_trials=2, storage=journal, study_name="s", **QUICK)
    states = {t.number: (t.state, t.counted) for t in result.trials}
    assert states == {0: ("COMPLETE", True), 1: ("FAIL", False), 2: ("COMPLETE", True)}
    assert result.trials[1].reason.startswith(f"interrupted: its worker {socket.gethostname()}")


@pytest.mark.slow
def test_two_worker_processes_finish_exactly_n_trials(tmp_path, data):
    journal = str(tmp_path / "journal.log")
    factory = functools.partial(tiny_model, seed=0)  # picklable for the spawned workers
    result = search(factory, *data, SPACE, n_trials=5, storage=journal, study_name="w",
                    workers=2, **QUICK)  # fmt: skip
    numbers = [t.number for t in result.trials]
    assert result.n_trials == 5 and sorted(numbers) == list(range(5))
    assert all(t.state in ("COMPLETE", "PRUNED") and t.counted for t in result.trials)
    study = optuna.load_study(study_name="w", storage=_journal(journal))
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2, workers


def test_a_custom_space_is_honoured_and_every_value_reaches_training(data):
    space = {
        "lr": {"low": 1e-3, "high": 1e-2, "log": True}, "batch-size": [4, 8],
        "grad_accum": {"low": 1, "high": 2}, "warmup": [0.0, 0.5], "precision": ["fp32", "bf16"],
        "clip_norm": [None, 0.5], "weight_decay": 0.0,
    }  # fmt: skip
    result = search(tiny_model, *data, space, n_trials=6, steps=4, batch_size=8, eval_batches=2,
                    pruner="none", seed=3)  # fmt: skip
    searched = {"lr", "batch_size", "grad_accum", "warmup", "precision", "clip_norm"}
    study = result.study
    assert result.n_trials == 6 and result.baseline_number is None  # warmup 0.05 is no choice
    for trial, record in zip(study.trials, result.trials):
        p = trial.params
        assert set(p) == searched and record.state == "COMPLETE"
        assert 1e-3 <= p["lr"] <= 1e-2 and p["batch_size"] in (4, 8) and p["grad_accum"] in (1, 2)
        cfg = TrainConfig.from_dict(trial.user_attrs["config"])  # what fit(**cfg.fit) was given
        assert (cfg.fit.lr, cfg.fit.batch_size, cfg.fit.grad_accum, cfg.fit.warmup) == (
            p["lr"], p["batch_size"], p["grad_accum"], p["warmup"])  # fmt: skip
        assert (cfg.precision, cfg.fit.clip_norm, cfg.fit.weight_decay) == (
            p["precision"], p["clip_norm"], 0.0)  # fmt: skip
        m = record.metrics  # what the training run itself reports
        assert m["precision"] == p["precision"]
        assert m["tokens"] == 4 * p["batch_size"] * p["grad_accum"] * 15
        assert m["first_lr"] == pytest.approx(p["lr"] * lr_factor(0, cfg.fit))
    assert {t.params["precision"] for t in study.trials} == {"fp32", "bf16"}


def test_space_errors_name_the_key_and_the_valid_ones(data):
    base = TrainConfig()
    bad = [
        (
            {"learning_rate": [1e-3]},
            "search space key 'learning_rate' is not a searchable setting;"
            " valid keys: batch_size, clip_norm, compensation, grad_accum, lora, lora_alpha,"
            " lora_dropout, lr, optimizer_state, precision, warmup, weight_decay",
        ),
        ({"batch_size": {"low": 8, "high": 32}}, "'batch_size' takes a list of choices"),
        ({"lr": {"low": 1e-2, "high": 1e-3}}, "need low < high"),
        ({"lr": {"low": 0.0, "high": 1e-3, "log": True}}, "low > 0 with log"),
        ({"lr": {"min": 1e-4, "high": 1e-3}}, "a range needs 'low' and 'high'"),
        ({"grad_accum": {"low": 1, "high": 2.5}}, "must be whole numbers"),
        ({"warmup": [0.0, 1.5]}, "search space 'warmup': warmup=1.5 is invalid"),
        ({"batch_size": [8, 8]}, "must be distinct"),
        ({}, "the search space is empty"),
    ]
    for space, message in bad:
        with pytest.raises(ConfigError) as info:
            search_space.parse_space(space, base)
        assert message in str(info.value)
    with pytest.raises(PrecisionError, match="tf32"):
        search_space.parse_space({"precision": ["fp32", "tf32"]}, base, "cpu")
    with pytest.raises(ConfigError, match="batch size 64 is larger than the 48 training blocks"):
        search(tiny_model, *data, {"batch_size": [8, 64]}, n_trials=1, steps=1)
    with pytest.raises(ConfigError, match="workers=2 need a shared storage"):
        search(tiny_model, *data, SPACE, n_trials=2, workers=2, steps=1)


def test_spaces_load_from_json_toml_and_yaml(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    (tmp_path / "s.toml").write_text('precision = ["fp32", "bf16"]\n[lr]\nlow = 1e-4\n'
                                     'high = 1e-2\nlog = true\n')  # fmt: skip
    assert search_space.load_space(tmp_path / "s.json") == {
        "lr": {"low": 1e-4, "high": 1e-2, "log": True}}  # fmt: skip
    loaded = search_space.load_space(tmp_path / "s.toml")
    dims = search_space.parse_space(loaded, TrainConfig())
    assert dims["lr"].log and dims["precision"].choices == ("fp32", "bf16")
    (tmp_path / "bad.json").write_text("{lr: 1")
    with pytest.raises(ConfigError, match="not valid JSON at line 1"):
        search_space.load_space(tmp_path / "bad.json")
    (tmp_path / "s.yaml").write_text("precision: [fp32, bf16]\nlr: {low: 1e-4, high: 1e-2}\n")
    assert search_space.load_space(tmp_path / "s.yaml")["lr"] == {"low": 1e-4, "high": 1e-2}


def test_apply_puts_each_name_into_its_config_field():
    cfg = search_space.apply(TrainConfig(), {"lr": 0.02, "batch_size": 4, "grad_accum": 3,
                             "warmup": 0.2, "weight_decay": 0.05, "clip_norm": None,
                             "precision": "fp16"})  # fmt: skip
    assert cfg.fit == FitOptions(lr=0.02, batch_size=4, grad_accum=3, warmup=0.2,
                                 weight_decay=0.05, clip_norm=None)  # fmt: skip
    assert cfg.precision == "fp16" and TrainConfig().fit.lr == 1e-3


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://amp:s3cret@db.example:5432/optuna", "postgresql://amp:***@db.example:5432/optuna"),
        ("postgresql+psycopg2://amp:p@ss/w0rd@db/optuna", "postgresql+psycopg2://amp:***@db/optuna"),
        ("mysql://amp@db/optuna?password=s3cret&x=1", "mysql://amp@db/optuna?password=***&x=1"),
        ("sqlite:///runs/search.db", "sqlite:///runs/search.db"),
        ("runs/search-a/journal.log", "runs/search-a/journal.log"),
    ],
)  # fmt: skip
def test_redact_hides_passwords(url, shown):
    assert redact(url) == shown


def test_a_password_with_a_stray_at_is_quoted_to_connect_and_scrubbed_in_pieces():
    from amptrain.secrets import quoted_password, scrub, url_secrets

    url = "postgresql://amp:se@cret-Pw0rd/42@db.example:5432/optuna"
    assert quoted_password(url) == "postgresql://amp:se%40cret-Pw0rd%2F42@db.example:5432/optuna"
    assert quoted_password("postgresql://amp:plain@host/db") == "postgresql://amp:plain@host/db"
    leaked = "failed to resolve host 'cret-Pw0rd/42@db.example'"  # a driver split at the first @
    assert "Pw0rd" not in scrub(leaked, url_secrets(url))


def test_a_storage_error_never_shows_the_password(data):
    url = "postgresql://amp:s3cret@127.0.0.1:1/optuna"
    with pytest.raises(ConfigError) as info:
        search(tiny_model, *data, SPACE, n_trials=1, steps=1, storage=url)
    assert "s3cret" not in str(info.value) and "amp:***@127.0.0.1" in str(info.value)


def test_records_keep_the_tier3_keys_and_serialise(data):
    result = search(tiny_model, *data, SPACE, n_trials=2, **QUICK)
    tier3 = {"best_params": result.best_params, "best_value": result.best_value,
             "n_trials": result.n_trials, "all_trials": result.all_trials}  # fmt: skip
    assert tier3["n_trials"] == 2 and set(tier3["best_params"]) == {"lr", "batch_size"}
    assert [set(t) for t in tier3["all_trials"]] == [{"number", "value", "params"}] * 2
    assert json.loads(json.dumps(result.to_dict()))["all_trials"] == result.all_trials


def test_two_objectives_give_a_pareto_front(data):
    result = search(tiny_model, *data, SPACE, n_trials=4, objectives=("val_loss", "tokens_per_s"),
                    **QUICK)  # fmt: skip
    for trial in result.trials:
        assert trial.state == "COMPLETE" and len(trial.values) == 2
        assert trial.values[1] == trial.metrics["tokens_per_s"] > 0
    done = [t for t in result.trials if t.state == "COMPLETE"]

    def dominates(a, b) -> bool:  # lower loss and higher tokens/s, better in one at least
        return a.values[0] <= b.values[0] and a.values[1] >= b.values[1] and a.values != b.values

    front = {b.number for b in done if not any(dominates(a, b) for a in done)}
    assert set(result.pareto_front) == front and result.best_number in front
    assert result.best_value == min(t.value for t in done if t.number in front)
    caption = " ".join(report.console_table(result).caption.split())
    assert f"Pareto front (val loss vs tokens/s): trials {', '.join(map(str, sorted(front)))}" in (
        caption)  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(report.trials_csv(result))))
    assert {int(r["number"]) for r in rows if r["pareto"] == "True"} == front


def test_resuming_with_other_settings_is_refused(tmp_path, data):
    journal = str(tmp_path / "journal.log")
    search(tiny_model, *data, SPACE, n_trials=1, storage=journal, study_name="s", **QUICK)
    with pytest.raises(ConfigError, match="was run with other budget_steps"):
        search(tiny_model, *data, SPACE, n_trials=2, storage=journal, study_name="s",
               **{**QUICK, "steps": 3})  # fmt: skip


def test_cli_search_writes_the_run_and_its_best_command_reproduces_it(tmp_path, corpus, capsys):
    space = tmp_path / "space.toml"
    space.write_text("lr = { low = 1e-3, high = 3e-2, log = true }\nbatch-size = [4, 8]\n")
    out = tmp_path / "runs"
    tiny = ["--data", str(corpus), "--context", "32", "--layers", "1", "--width", "16",
            "--heads", "2", "--batch-size", "8", "--eval-batches", "2", "--precision", "fp32",
            "--no-progress", "--out", str(out)]  # fmt: skip
    code = main(["search", *tiny, "--space", str(space), "--trials", "3", "--budget-steps", "3",
                 "--study-name", "t"])  # fmt: skip
    assert code == 0
    run = out / "search-t"
    assert {"config.json", "trials.csv", "best.json", "journal.log"} <= {
        p.name for p in run.iterdir()}  # fmt: skip
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1", "2"] and rows[0]["baseline"] == "True"
    assert {"state", "value", "lr", "batch_size", "reason", "duration_s"} <= set(rows[0])
    best = json.loads((run / "best.json").read_text())
    command = shlex.split(best["command"])
    assert command[:2] == ["amptrain", "train"]
    assert command[command.index("--lr") + 1] == str(best["params"]["lr"])
    if MATPLOTLIB:
        assert (run / "history.png").read_bytes()[:4] == b"\x89PNG"
        assert (run / "parallel.png").exists() and (run / "importances.png").exists()
    printed = capsys.readouterr().out
    assert "amptrain search" in printed and str(run) in printed
    # The command line in best.json trains exactly the best trial again (fp32 here: fp16/bf16
    # kernels of this CPU may round differently when memory is laid out differently).
    code = main([*command[1:], "--data", str(corpus), "--out", str(tmp_path / "again"),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    (again,) = (tmp_path / "again").iterdir()
    summary = json.loads((again / "summary.json").read_text())
    assert summary["final_val_loss"] == best["value"]


def test_cli_bad_space_exits_2_before_any_run(tmp_path, corpus, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning-rate": [1e-3]}))
    out = tmp_path / "runs"
    code = main(["search", "--data", str(corpus), "--space", str(space), "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 2
    assert "'learning-rate' is not a searchable setting" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def _journal(path):
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(path))


def test_cli_never_prints_or_writes_the_storage_password(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("AMPTRAIN_TEST_DB", "postgresql://amp:s3cret@127.0.0.1:1/optuna")
    out = tmp_path / "runs"
    code = main(["search", "--data", str(corpus), "--context", "32", "--layers", "1", "--width",
                 "16", "--heads", "2", "--batch-size", "8", "--no-progress", "--out", str(out),
                 "--storage", "env:AMPTRAIN_TEST_DB", "--study-name", "p"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and "postgresql://amp:***@127.0.0.1:1/optuna" in captured.err
    assert "s3cret" not in captured.out + captured.err
    files = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not any(b"s3cret" in p.read_bytes() for p in files)
