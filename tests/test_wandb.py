"""The W&B sink against the real wandb package, offline: files, failures, timeouts, secrets."""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from conftest import pattern_blocks, tiny_model  # noqa: E402

from amptrain import _imports, fit  # noqa: E402
from amptrain.config import FitOptions, TrainConfig  # noqa: E402
from amptrain.metrics.wandb_sink import WandbSink, run_config  # noqa: E402
from amptrain.precision import resolve  # noqa: E402
from amptrain.train import run_training  # noqa: E402

FAKE_KEY = "wandb_FAKEKEY_0123456789abcdef"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B with a fake key; every file W&B writes goes under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.chdir(tmp_path)
    return tmp_path


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


@pytest.fixture
def amptrain_log():
    """What the "amptrain" logger emits (its propagation may be off after a CLI test)."""
    logger, handler = logging.getLogger("amptrain"), _Records()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record W&B's writer has not flushed yet
            break
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def history_and_config(run_dir: Path) -> tuple[dict[int, dict], dict]:
    history, config = {}, {}
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
        items = {"run": r.run.config.update, "config": r.config.update}.get(kind, [])
        config.update({_key(i): json.loads(i.value_json) for i in items})
    return history, config


def settled_history(run_dir: Path, ready) -> tuple[dict[int, dict], dict]:
    """`history_and_config` once `ready(history)` holds: W&B's writer may still be flushing."""
    for _ in range(100):
        history, config = history_and_config(run_dir)
        if ready(history):
            break
        time.sleep(0.1)
    return history, config


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def offline_run(root: Path) -> Path:
    (run_dir,) = [p for p in (root / "wandb").glob("offline-run-*") if not p.is_symlink()]
    return run_dir


def assert_no_key_anywhere(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_offline_run_holds_metrics_precision_and_no_key(wandb_env, amptrain_log):
    prec = resolve("bf16", "cpu")
    config = {"lr": 3e-3, "precision": "bf16-mixed", "wandb_api_key": FAKE_KEY}
    sink = WandbSink("amptrain-test", config=config, precision=prec, dir=str(wandb_env))
    train, val = pattern_blocks(48), pattern_blocks(16, seed=1)
    result = fit(tiny_model(), train, val, precision=prec, sinks=[sink], max_steps=4, log_every=1,
                 batch_size=8, eval_every=2, eval_batches=1, lr=3e-3)  # fmt: skip
    run_dir = offline_run(wandb_env)
    assert list((run_dir / "files").iterdir())  # W&B's own files are there too
    for _ in range(100):  # W&B's internal writer may still be flushing the last block
        history, cfg = history_and_config(run_dir)
        if 4 in history and "precision" in cfg:
            break
        time.sleep(0.1)
    assert cfg["precision"] == "bf16" and cfg["precision_requested"] == "bf16-mixed"
    assert cfg["precision_reason"] == prec.reason and cfg["lr"] == 3e-3
    assert "wandb_api_key" not in cfg and cfg["mem/source"] == "process-rss"
    steps = {r["step"]: r for r in result.history if "train/loss" in r}
    evals = {r["step"]: r for r in result.history if "val/loss" in r}
    assert sorted(history) == [0, 1, 2, 3, 4]  # the global optimizer step, eval at 0 included
    assert history[4]["train/loss"] == pytest.approx(steps[4]["train/loss"])
    assert history[2]["val/loss"] == pytest.approx(evals[2]["val/loss"])
    assert {"amp/loss_scale", "amp/skipped_steps", "perf/tokens_per_s", "mem/peak_mb"} <= set(
        history[3]
    )
    assert amptrain_log.warnings() == []
    assert_no_key_anywhere(wandb_env)


def test_run_training_takes_the_sink(wandb_env):
    fit_options = FitOptions(max_steps=2, batch_size=4, eval_every=2, eval_batches=1)
    cfg = TrainConfig(context=16, model_kwargs={"n_layer": 1, "n_embd": 16, "n_head": 2},
                      out=str(wandb_env / "runs"), precision="fp16", fit=fit_options)  # fmt: skip
    sink = WandbSink(config=cfg.to_dict(), precision=resolve("fp16", "cpu"), dir=str(wandb_env))
    sink.log_config({"note": "set after the start"})  # what train.py does once it resolved
    run = run_training(cfg, sinks=[sink])
    history, config = history_and_config(offline_run(wandb_env))
    assert config["precision"] == "fp16" and "GradScaler" in config["precision_reason"]
    assert config["note"] == "set after the start"
    assert config["fit"]["max_steps"] == 2
    assert history[2]["amp/loss_scale"] == run.result.loss_scale == 65536.0
    assert_no_key_anywhere(wandb_env)


def test_a_shared_run_keeps_its_owner_and_loses_no_record(wandb_env, amptrain_log):
    run = wandb.init(project="p", dir=str(wandb_env))  # the notebook's own run
    run.log({"other/metric": 1.0}, step=100)  # its step counter is already past ours
    sink = WandbSink(run=run, precision=resolve("fp32", "cpu"))
    fit(tiny_model(), pattern_blocks(32), precision="fp32", sinks=[sink], max_steps=3, log_every=1,
        batch_size=8)  # fmt: skip
    run.log({"other/metric": 2.0})  # still open: the sink did not finish it
    run.finish()
    history, config = settled_history(offline_run(wandb_env), lambda h: len(h) >= 4)
    ours = sorted(r["global_step"] for r in history.values() if "train/loss" in r)
    assert ours == [1, 2, 3] and config["precision"] == "fp32"
    assert amptrain_log.warnings() == []


def test_compat_use_wandb_starts_a_run_at_the_global_step(wandb_env, tmp_path_factory):
    from amptrain.compat import test_fine_tuning

    def run_dirs() -> set[Path]:
        # W&B keeps the folder of its first run in this process for runs started without dir=.
        found = tmp_path_factory.getbasetemp().rglob("offline-run-*")
        return {p for p in found if not p.is_symlink()}

    before = run_dirs()
    r = test_fine_tuning(tiny_model(), None, train_data=pattern_blocks(20), n_epochs=2,
                         batch_size=8, use_wandb=True, use_amp=True)  # fmt: skip
    (new,) = run_dirs() - before
    history, config = history_and_config(new)
    steps = sorted(k for k, row in history.items() if "train/loss" in row)
    assert steps == list(range(1, len(r["loss_history"]) + 1))  # steps, not epochs
    assert config["precision"] == r["precision"] and config["n_epochs"] == 2


def test_init_failure_costs_one_warning_and_not_the_run(wandb_env, amptrain_log, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    sink = WandbSink("p", mode="online", init_timeout=20)  # the fake key is refused at once
    assert not sink.enabled
    result = fit(tiny_model(), pattern_blocks(32), precision="fp32", sinks=[sink],
                 max_steps=2, batch_size=8)  # fmt: skip
    assert result.steps == 2
    (warning,) = amptrain_log.warnings()
    assert "W&B init failed" in warning and FAKE_KEY not in warning


def test_a_required_run_that_cannot_start_is_refused(wandb_env, amptrain_log, monkeypatch):
    from amptrain.errors import TrackerError

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # well-formed, so W&B itself must refuse
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(TrackerError, match=r"W&B (init failed|did not start).*WANDB_MODE=offline"):
        WandbSink("p", mode="online", init_timeout=3, required=True)
    with pytest.raises(TrackerError, match=r"within 0.01 s"):  # offline start takes longer
        WandbSink("p", init_timeout=0.01, dir=str(wandb_env), required=True)
    assert amptrain_log.warnings() == []  # refused, not warned
    deadline = time.monotonic() + 60  # the late starts end in the background, then clean up
    while time.monotonic() < deadline and any(
        t.name == "amptrain-wandb" for t in threading.enumerate()
    ):
        time.sleep(0.1)
    assert not (wandb_env / "wandb").exists()  # nothing left of runs that never trained


def test_init_timeout_costs_one_warning(wandb_env, amptrain_log):
    start = time.perf_counter()
    sink = WandbSink("p", init_timeout=0.01, dir=str(wandb_env))  # offline start takes longer
    assert time.perf_counter() - start < 0.5 and not sink.enabled
    fit(tiny_model(), pattern_blocks(32), precision="fp32", sinks=[sink], max_steps=1,
        batch_size=8)  # fmt: skip
    assert sink.wait(15)  # the late run is finished by the worker, not left open
    assert sink.run is None
    (warning,) = amptrain_log.warnings()
    assert "within 0.01 s" in warning


def test_log_failure_and_stall_cost_one_warning_each(wandb_env, amptrain_log, monkeypatch):
    broken = WandbSink("p", dir=str(wandb_env))
    broken.run.finish()  # behind the sink's back: every later W&B call raises UsageError
    fit(tiny_model(), pattern_blocks(32), precision="fp32", sinks=[broken], max_steps=3,
        batch_size=8)  # fmt: skip
    (warning,) = amptrain_log.warnings()
    assert "W&B log failed (UsageError" in warning or "W&B config failed (UsageError" in warning
    failure = broken.failure  # what summary.json keeps of it
    assert failure["sink"] == "W&B" and failure["during"] in ("log", "config")
    assert failure["error"].startswith("W&B") and "UsageError" in failure["error"]

    stuck = WandbSink("p", dir=str(wandb_env), log_timeout=0.2)
    run = stuck.run
    monkeypatch.setattr(run, "log", lambda *a, **k: time.sleep(1.0))  # a hung connection
    start = time.perf_counter()
    for step in range(1, 30):
        stuck.log({"train/loss": 1.0}, step)
        time.sleep(0.01)
    stuck.close()
    assert time.perf_counter() - start < 0.9
    first, second = amptrain_log.warnings()
    assert "not returned within 0.2 s" in second
    stuck.wait(5)
    run.finish()


def test_cli_train_wandb_logs_the_resolved_precision(wandb_env, capsys):
    from amptrain import cli

    argv = ["train", "--wandb", "cli-test", "--max-steps", "2", "--log-every", "1",
            "--batch-size", "4",
            "--context", "16", "--layers", "1", "--width", "16", "--heads", "2",
            "--eval-every", "2", "--eval-batches", "1", "--no-progress",
            "--out", str(wandb_env / "runs")]  # fmt: skip
    assert cli.main(argv) == 0
    offline = offline_run(wandb_env / "runs")  # beside the runs
    history, config = history_and_config(offline)
    assert config["precision_requested"] == "auto" and config["precision"] in ("bf16", "fp32")
    assert config["precision_reason"].startswith("auto:") and sorted(history) == [0, 1, 2]
    # The resolved run: fit's options, the fast path, the run directory it belongs to.
    (run_dir,) = (wandb_env / "runs").glob("train-*")
    assert config["fit"]["max_steps"] == 2 and config["fit"]["eval_batches"] == 1
    assert config["fast_path"]["optimizer_impl"] and config["environment"]["torch"]
    assert config["run_dir"] == str(run_dir.resolve())
    (run,) = [r.run for r in wandb_records(offline) if r.WhichOneof("record_type") == "run"]
    assert run.display_name == run_dir.name and str(run_dir.resolve()) in run.notes
    assert_no_key_anywhere(wandb_env)


def test_run_config_drops_secrets_and_keeps_the_request(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    values = run_config(
        {"precision": "auto", "token": FAKE_KEY, "nested": {"WANDB_API_KEY": "x", "a": 1}},
        precision="bf16", reason="auto: AMX",
    )  # fmt: skip
    assert values == {"precision": "bf16", "precision_requested": "auto",
                      "precision_reason": "auto: AMX", "nested": {"a": 1}}  # fmt: skip


def test_missing_wandb_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(_imports, "WANDB_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'amptrain\[wandb\]'"):
        WandbSink("p")
