"""TensorBoard and MLflow sinks, read back from the event files and the MLflow store they wrote."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from conftest import pattern_blocks, tiny_model

from amptrain import _imports, fit
from amptrain.precision import resolve

FAKE_KEY = "wandb_FAKEKEY_0123456789abcdef"
FIT = dict(max_steps=4, batch_size=8, eval_every=2, eval_batches=1, lr=3e-3, log_every=1)


@pytest.fixture
def warnings_seen(caplog):
    caplog.set_level(logging.WARNING, logger="amptrain")
    return lambda: [r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING and r.name == "amptrain"]  # fmt: skip


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    return {"lr": 3e-3, "precision": "auto", "wandb_api_key": FAKE_KEY, "data": {"token": FAKE_KEY}}


def _train(sink, precision):
    train, val = pattern_blocks(48), pattern_blocks(16, seed=1)
    return fit(tiny_model(), train, val, precision=precision, sinks=[sink], **FIT)


def _numbers(history) -> dict[str, dict[int, float]]:
    """metric name -> {step: value}, as the loop produced them."""
    out: dict[str, dict[int, float]] = {}
    for record in history:
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                out.setdefault(name, {})[record["step"]] = float(value)
    return out


def _no_key_in(root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files and not [p for p in files if FAKE_KEY.encode() in p.read_bytes()]


# ---- TensorBoard ----


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _hparams(events) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for name, value in start.hparams.items()}  # fmt: skip


def _hparams_record(events) -> tuple[list[str], int | None]:
    """The HPARAMS tab's metric columns, and the status of the session's end (None if open)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    contents = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(contents["_hparams_/experiment"])
    end = contents.get("_hparams_/session_end_info")
    parse = plugin_data_pb2.HParamsPluginData.FromString
    status = parse(end).session_end_info.status if end else None
    return [m.name.tag for m in experiment.experiment.metric_infos], status


@pytest.mark.slow  # importing TensorBoard's reader takes seconds
def test_tensorboard_event_files_hold_the_metrics_and_the_precision(tmp_path, secret_env,
                                                                     warnings_seen):  # fmt: skip
    pytest.importorskip("tensorboard")
    from amptrain.metrics.tensorboard_sink import TensorBoardSink

    prec = resolve("auto", "cpu")
    sink = TensorBoardSink(tmp_path / "tb", config=secret_env, precision=prec)
    result = _train(sink, prec)
    events = _events(tmp_path / "tb")
    for name, by_step in _numbers(result.history).items():
        written = {e.step: e.value for e in events.Scalars(name)}
        assert written == pytest.approx(by_step, rel=1e-6, nan_ok=True), name
    assert {"train/loss", "val/loss", "amp/loss_scale", "perf/tokens_per_s"} <= set(
        events.Tags()["scalars"])  # fmt: skip
    assert sorted(e.step for e in events.Scalars("train/loss")) == [1, 2, 3, 4]
    (source,) = events.Tensors("mem/source/text_summary")
    assert source.tensor_proto.string_val == [b"process-rss"]
    params = _hparams(events)
    assert params["precision"] == prec.name and params["precision_reason"] == prec.reason
    assert params["precision_requested"] == "auto" and params["lr"] == 3e-3
    assert not [k for k in params if "api_key" in k] and "data.token" not in params
    # fit's resolved options and fast path, not only the config= given
    assert params["fit.max_steps"] == 4 and params["fit.batch_size"] == 8
    assert params["fast_path.optimizer_impl"] == result.fast_path["optimizer_impl"]
    metrics, ends = _hparams_record(events)
    assert metrics == ["val/loss", "train/loss"] and ends == 1  # 1: STATUS_SUCCESS, at close
    assert warnings_seen() == []
    _no_key_in(tmp_path / "tb")


def test_tensorboard_failure_costs_one_warning_and_not_the_run(tmp_path, warnings_seen):
    pytest.importorskip("tensorboard")
    from amptrain.metrics.tensorboard_sink import TensorBoardSink

    (tmp_path / "taken").write_text("a file where the log folder should go")
    sink = TensorBoardSink(tmp_path / "taken" / "tb", config={"lr": 3e-3})
    result = _train(sink, resolve("fp32", "cpu"))
    assert result.steps == 4 and not sink.enabled
    (warning,) = warnings_seen()
    assert warning.startswith("TensorBoard start failed") and "continues without" in warning


def test_tensorboard_folder_removed_mid_run_is_one_warning_and_no_traceback(
    tmp_path, warnings_seen, capfd
):
    pytest.importorskip("tensorboard")
    import shutil

    from amptrain.metrics.tensorboard_sink import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tb" / "run", config={"lr": 3e-3})

    class RemoveAtStep2:
        def log(self, metrics, step):
            if step == 2:
                time.sleep(0.2)  # TensorBoard's thread has written step 1
                shutil.rmtree(tmp_path / "tb", ignore_errors=True)

        def close(self):
            pass

    train, val = pattern_blocks(48), pattern_blocks(16, seed=1)
    result = fit(tiny_model(), train, val, precision=resolve("fp32", "cpu"),
                 sinks=[RemoveAtStep2(), sink], **FIT)  # fmt: skip
    assert result.steps == 4 and sink.failure["during"] == "log"
    (warning,) = warnings_seen()
    assert "log folder" in warning and "was removed" in warning
    assert "Traceback" not in capfd.readouterr().err


# ---- MLflow ----


def _mlflow_run(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("amptrain").experiment_id])
    return client, run


@pytest.mark.slow  # a new MLflow SQLite store runs its schema migrations
def test_mlflow_store_holds_the_metrics_and_the_precision(tmp_path, secret_env, warnings_seen):
    pytest.importorskip("mlflow")
    from amptrain.metrics.mlflow_sink import MlflowSink, local_store

    uri = local_store(tmp_path / "mlflow" / "mlflow.db")
    prec = resolve("auto", "cpu")
    result = _train(MlflowSink(uri, config=secret_env, precision=prec), prec)
    client, run = _mlflow_run(uri)
    for name, by_step in _numbers(result.history).items():
        written = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert written == pytest.approx(by_step, nan_ok=True), name
    params = run.data.params
    assert params["precision"] == prec.name and params["precision_reason"] == prec.reason
    assert params["precision_requested"] == "auto" and float(params["lr"]) == 3e-3
    assert not [k for k in params if "api_key" in k] and "data.token" not in params
    assert params["fit.max_steps"] == "4" and params["fit.eval_every"] == "2"
    assert params["fast_path.attention"] == result.fast_path["attention"]
    assert run.data.tags["mem/source"] == "process-rss" and run.info.status == "FINISHED"
    assert warnings_seen() == []
    _no_key_in(tmp_path / "mlflow")


def test_mlflow_server_down_costs_one_warning_without_the_password(monkeypatch, warnings_seen):
    pytest.importorskip("mlflow")
    from amptrain.metrics.mlflow_sink import MlflowSink

    sink = MlflowSink("http://amp:PW_FAKE_987@127.0.0.1:1", config={"lr": 3e-3})
    result = _train(sink, resolve("fp32", "cpu"))
    assert result.steps == 4 and not sink.enabled
    (warning,) = warnings_seen()
    assert warning.startswith("MLflow start failed") and "PW_FAKE_987" not in warning


# ---- the CLI and the install hints ----


@pytest.mark.slow
def test_cli_train_logs_to_tensorboard_and_mlflow(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from amptrain import cli

    out = tmp_path / "runs"
    argv = ["train", "--tensorboard", "--mlflow", "--max-steps", "2", "--log-every", "1",
            "--batch-size", "4",
            "--context", "16", "--layers", "1", "--width", "16", "--heads", "2",
            "--eval-every", "2", "--eval-batches", "1", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    (run_dir,) = out.glob("train-*")
    (tb_run,) = (out / "tensorboard").iterdir()
    assert tb_run.name == run_dir.name  # one TensorBoard run per run directory, same name
    events = _events(tb_run)
    assert sorted(e.step for e in events.Scalars("train/loss")) == [1, 2]
    params = _hparams(events)
    assert params["precision_requested"] == "auto" and params["precision_reason"].startswith("auto")
    assert params["run_dir"] == str(run_dir.resolve()) and params["fit.max_steps"] == 2
    assert params["environment.torch"] and params["fast_path.loss"]
    assert _hparams_record(events) == (["val/loss", "train/loss"], 1)
    client, run = _mlflow_run(f"sqlite:///{(out / 'mlflow.db').resolve()}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [0, 2]
    assert run.data.params["precision"] == params["precision"]
    assert run.info.run_name == run_dir.name
    assert run.data.tags["amptrain.run_dir"] == str(run_dir.resolve())


@pytest.mark.parametrize("flag, extra", [("TENSORBOARD_AVAILABLE", "tensorboard"),
                                         ("MLFLOW_AVAILABLE", "mlflow")])  # fmt: skip
def test_missing_package_gives_the_install_hint(monkeypatch, tmp_path, flag, extra):
    from amptrain.metrics.mlflow_sink import MlflowSink
    from amptrain.metrics.tensorboard_sink import TensorBoardSink

    monkeypatch.setattr(_imports, flag, False)
    sink = TensorBoardSink if extra == "tensorboard" else MlflowSink
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'amptrain\[{extra}\]'"):
        sink(str(tmp_path))


def test_a_failure_records_the_step_of_the_failed_call_not_the_step_reached_since():
    import threading

    from amptrain.metrics.external import ExternalSink

    later = threading.Event()

    class SlowThenBroken(ExternalSink):
        tool = "Slow"

        def _write_params(self, params):
            pass

        def _write_numbers(self, numbers, step):
            later.wait(10)  # training has gone on to step 3 meanwhile
            raise ConnectionError(f"lost at step {step}")

        def _write_texts(self, texts, step):
            pass

        def _finish(self):
            pass

    sink = SlowThenBroken()
    for step in (1, 2, 3):
        sink.log({"train/loss": 1.0}, step)
    later.set()
    sink.close()
    assert sink.failure["step"] == 1 and "lost at step 1" in sink.failure["error"]
