"""Trackers asked for on the command line are honoured or refused before the first step.

Each refusal is exit 2, one line with the reason and the fix, no run directory and no training
step (a spy on the real `train_step` counts them). A tracker that fails mid-run is kept in
summary.json. MLflow's folder store (`file:./mlruns`) is written through MLflow's opt-in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amptrain import _imports, stepping
from amptrain.cli import main

SMALL = ["--max-steps", "3", "--batch-size", "4", "--context", "16", "--layers", "1",
         "--width", "16", "--heads", "2", "--eval-every", "3", "--eval-batches", "1",
         "--no-progress"]  # fmt: skip


@pytest.fixture
def steps(monkeypatch):
    """The training steps taken in this process: the real step, counted."""
    taken, real = [], stepping.train_step

    def counted(*args, **kwargs):
        taken.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stepping, "train_step", counted)
    return taken


def _refused(code: int, err: str, out: Path, *words: str) -> str:
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert code == 2 and len(said) == 1, err
    assert "Traceback" not in err and not list(out.glob("train-*")), err
    for word in words:
        assert word in said[0], said[0]
    return said[0]


def test_tensorboard_that_cannot_write_is_refused_before_step_1(tmp_path, capsys, steps):
    pytest.importorskip("tensorboard")
    (tmp_path / "taken").write_text("a file where the log folder should go")
    out = tmp_path / "runs"
    code = main(["train", "--tensorboard", str(tmp_path / "taken" / "tb"), "--out", str(out),
                 *SMALL])  # fmt: skip
    _refused(code, capsys.readouterr().err, out, "TensorBoard could not start", "--tensorboard")
    assert steps == []


@pytest.mark.slow  # importing MLflow takes seconds
def test_mlflow_server_down_is_refused_before_step_1(tmp_path, capsys, steps, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    out = tmp_path / "runs"
    code = main(["train", "--mlflow", "http://amp:PW_FAKE_987@127.0.0.1:1", "--out", str(out),
                 *SMALL])  # fmt: skip
    line = _refused(code, capsys.readouterr().err, out, "MLflow could not start", "--mlflow")
    assert "PW_FAKE_987" not in line and steps == []


@pytest.mark.parametrize("flag, extra", [("TENSORBOARD_AVAILABLE", "tensorboard"),
                                         ("MLFLOW_AVAILABLE", "mlflow"),
                                         ("WANDB_AVAILABLE", "wandb")])  # fmt: skip
def test_a_tracker_not_installed_is_refused_before_step_1(tmp_path, capsys, steps, monkeypatch,
                                                          flag, extra):  # fmt: skip
    monkeypatch.setattr(_imports, flag, False)
    out = tmp_path / "runs"
    code = main(["train", f"--{extra}", "--out", str(out), *SMALL])
    _refused(code, capsys.readouterr().err, out, f"pip install 'amptrain[{extra}]'")
    assert steps == [] and not out.exists()


def _wandb_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment with no W&B login anywhere: no key, no netrc entry, no settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(NETRC=str(tmp_path / "netrc"), HOME=str(tmp_path),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), **extra)  # fmt: skip
    return env


@pytest.mark.slow  # a fresh process, so that W&B reads this environment
@pytest.mark.parametrize("key, words", [(None, ["no login", "wandb login", "WANDB_MODE=offline"]),
                                        ("short", ["refused the credentials", "40"])])  # fmt: skip
def test_wandb_without_a_login_is_refused_before_anything(tmp_path, key, words):
    pytest.importorskip("wandb")
    out = tmp_path / "runs"
    env = _wandb_env(tmp_path, **({"WANDB_API_KEY": key} if key else {}))
    done = subprocess.run([sys.executable, "-m", "amptrain", "train", "--wandb", "--out",
                           str(out), *SMALL], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    _refused(done.returncode, done.stderr, out, *words)
    assert not out.exists() and not (tmp_path / "wandb").exists()


@pytest.mark.slow  # a fresh process, so that W&B reads this environment
def test_wandb_offline_needs_no_login(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "runs"
    env = _wandb_env(tmp_path, WANDB_MODE="offline")
    done = subprocess.run([sys.executable, "-m", "amptrain", "train", "--wandb", "--out",
                           str(out), *SMALL], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (run_dir,) = out.glob("train-*")
    assert list((out / "wandb").glob("offline-run-*")) and (run_dir / "wandb.json").is_file()
    assert "wandb:" not in done.stderr  # W&B's own chatter stays quiet without -v


def _mlflow_runs(uri: str, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading a folder store needs it too
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("amptrain")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow  # importing MLflow takes seconds
def test_mlflow_folder_store_is_written_and_named_after_the_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out, store = tmp_path / "runs", f"file:{tmp_path / 'mlruns'}"
    assert main(["train", "--mlflow", store, "--out", str(out), *SMALL]) == 0
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # the opt-in did not leak
    (run_dir,) = out.glob("train-*")
    client, (run,) = _mlflow_runs(store, monkeypatch)
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.tags["amptrain.run_dir"] == str(run_dir.resolve())
    params = run.data.params
    # The resolved run: every option fit ran with, the precision decision, the fast path.
    assert params["fit.max_steps"] == "3" and params["fit.grad_accum"] == "1"
    assert params["precision_requested"] == "auto" and params["precision_reason"]
    assert params["fast_path.optimizer_impl"] and params["fast_path.attention"]
    assert params["run_dir"] == str(run_dir.resolve())
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in history] == [0, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tracker_failures"] == []


class _DeleteRunAt:
    """Deletes the MLflow run behind its sink's back at `step`, as someone in the UI might."""

    def __init__(self, sinks: list, step: int) -> None:
        self.sinks, self.step = sinks, step

    def log(self, metrics, step: int) -> None:
        if step == self.step:
            mlflow_sink = self.sinks[-1]
            assert mlflow_sink.flush()  # what was logged before is in; the next call fails
            mlflow_sink.client.delete_run(mlflow_sink.run_id)

    def close(self) -> None:
        pass


@pytest.mark.slow  # importing MLflow takes seconds
def test_a_tracker_failing_mid_run_is_kept_in_summary_json(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    from amptrain.config import FitOptions, TrainConfig
    from amptrain.metrics.mlflow_sink import MlflowSink
    from amptrain.train import run_training

    store = f"file:{tmp_path / 'mlruns'}"
    sinks: list = []

    def trackers(run_dir: Path) -> list:
        sinks.extend([_DeleteRunAt(sinks, 2), MlflowSink(store, run_dir=run_dir, required=True)])
        return sinks

    cfg = TrainConfig(context=16, model_kwargs={"n_layer": 1, "n_embd": 16, "n_head": 2},
                      out=str(tmp_path / "runs"), precision="fp32",
                      fit=FitOptions(max_steps=4, batch_size=4, eval_every=4, log_every=1,
                                     eval_batches=1))  # fmt: skip
    logging.getLogger("amptrain").propagate = True
    with caplog.at_level(logging.WARNING, logger="amptrain"):
        run = run_training(cfg, trackers=trackers)
    assert run.result.steps == 4  # training went on
    (failure,) = json.loads((run.run_dir / "summary.json").read_text())["tracker_failures"]
    assert failure["sink"] == "MLflow" and failure["during"] == "log" and failure["step"] == 2
    assert "MlflowException" in failure["error"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith("MLflow log failed") and "continues without MLflow" in warning


def test_a_tracker_refused_on_resume_leaves_every_file_of_the_run_as_it_was(tmp_path):
    from amptrain.config import FitOptions, TrainConfig
    from amptrain.errors import TrackerError
    from amptrain.train import run_training

    cfg = TrainConfig(context=16, model_kwargs={"n_layer": 1, "n_embd": 16, "n_head": 2},
                      out=str(tmp_path / "runs"), precision="fp32",
                      fit=FitOptions(max_steps=4, batch_size=4, eval_every=2, eval_batches=1,
                                     checkpoint_every=2))  # fmt: skip
    run_dir = run_training(cfg).run_dir
    shutil.rmtree(run_dir / "checkpoints" / f"step-{4:09d}")  # resuming at 2 would cut metrics
    files = lambda: {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}  # noqa: E731
    before = files()

    def refused(run_dir):
        raise TrackerError("the tracker could not start (a test's refusal)")

    with pytest.raises(TrackerError):
        run_training(cfg, trackers=refused, resume="auto")
    assert files() == before  # metrics.jsonl, config.json and the checkpoints untouched
