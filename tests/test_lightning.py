"""AmpMonitor in real Lightning Trainers on CPU: bf16-mixed, and fp16 with a CPU GradScaler."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from conftest import pattern_blocks, tiny_model  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from amptrain import _imports, capability  # noqa: E402
from amptrain.adapter import count_targets, next_token_loss  # noqa: E402
from amptrain.errors import PrecisionError  # noqa: E402
from amptrain.integrations.lightning import AmpMonitor, lightning_precision  # noqa: E402


def make_module(base: type) -> object:
    class TinyLM(base):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model()
            self.real_steps = 0  # optimizer.step() calls that really ran

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return next_token_loss(self.net(ids), ids) / count_targets(ids)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05)
            opt.register_step_post_hook(lambda *_: setattr(self, "real_steps", self.real_steps + 1))
            return opt

    return TinyLM()


def loader():
    ids = pattern_blocks(32).inputs
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=8)


def run(package, tmp_path, steps, monitor, accelerator="cpu", **trainer_kwargs):
    logger = package.loggers.CSVLogger(tmp_path)
    trainer = package.Trainer(
        max_steps=steps, accelerator=accelerator, enable_checkpointing=False, logger=logger,
        callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, **trainer_kwargs,
    )  # fmt: skip
    module = make_module(package.LightningModule)
    trainer.fit(module, loader())
    with open(f"{logger.log_dir}/metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("amp/loss_scale")]
    hparams = Path(logger.log_dir, "hparams.yaml").read_text()
    return module, rows, hparams


def test_bf16_mixed_trainer_logs_amp_state_to_its_csv_logger(tmp_path):
    module, rows, hparams = run(pl, tmp_path, 4, AmpMonitor(), precision="bf16-mixed")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # the global step, every step
    assert {r["amp/enabled"] for r in rows} == {"1.0"}
    assert {r["amp/precision_bits"] for r in rows} == {"16.0"}
    assert {r["amp/loss_scale"] for r in rows} == {"1.0"}  # bf16: no loss scaling
    assert {r["amp/skipped_steps"] for r in rows} == {"0.0"} and module.real_steps == 4
    assert "amp/precision: bf16-mixed" in hparams and "no loss scaling" in hparams


def test_fp16_plugin_with_cpu_scaler_logs_skips_backoffs_and_growth(tmp_path):
    # A loss scale of 2**24 overflows fp16 gradients: the first steps are skipped and the
    # scale backs off until it fits, then grows every 2 finite steps.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=2)
    monitor = AmpMonitor(log_every_n_steps=100)  # only events and the last step log
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    module, rows, hparams = run(pl, tmp_path, 16, monitor, plugins=[plugin])
    skipped = [r for r in rows if r["amp/step_skipped"] == "1.0"]
    assert monitor.skipped_steps == len(skipped) >= 1
    assert module.real_steps + monitor.skipped_steps == 16  # found-inf agrees with the optimizer
    assert monitor.scale_backoffs >= monitor.skipped_steps and monitor.scale_growths >= 1
    for r in rows:  # every logged scale is the initial one after the logged events
        events = float(r["amp/scale_growths"]) - float(r["amp/scale_backoffs"])
        assert float(r["amp/loss_scale"]) == 2.0**24 * 2.0**events
    assert rows[-1]["step"] == "16" and float(rows[-1]["amp/skipped_steps"]) == len(skipped)
    assert "amp/precision: 16-mixed" in hparams and "GradScaler" in hparams


def test_pytorch_lightning_trainer_works_too(tmp_path):
    ptl = pytest.importorskip("pytorch_lightning")
    _, rows, hparams = run(ptl, tmp_path, 2, AmpMonitor(), precision="bf16-mixed")
    assert [r["step"] for r in rows] == ["1", "2"] and "bf16-mixed" in hparams


def test_a_silently_changed_precision_is_reported(tmp_path):
    logger, seen = logging.getLogger("amptrain"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        _, rows, hparams = run(pl, tmp_path, 1, AmpMonitor(requested="fp16"),
                               precision="16-mixed")  # fmt: skip
    finally:
        logger.removeHandler(handler)
    assert "amp/precision: bf16-mixed" in hparams and "amp/precision_requested: fp16" in hparams
    assert len(seen) == 1 and "not the requested 'fp16'" in seen[0]


def test_lightning_precision_maps_names_and_says_why():
    assert lightning_precision("fp32", "cpu") == ("32-true", "requested")
    name, reason = lightning_precision("fp16", "cpu")
    assert name == "16-mixed" and "MixedPrecision('16-mixed', 'cpu'" in reason
    assert lightning_precision("bf16-mixed", "cpu")[0] == "bf16-mixed"
    auto, why = lightning_precision("auto", "cpu")
    assert auto == (
        "bf16-mixed" if capability.probe("cpu").clearly_faster("bf16") else "32-true"
    ) and why.startswith("auto")
    for bad in ("tf32", "16", "fp8"):
        with pytest.raises(PrecisionError):
            lightning_precision(bad, "cpu")


def test_missing_lightning_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(_imports, "LIGHTNING_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'amptrain\[lightning\]'"):
        AmpMonitor()


def test_amp_wandb_callback_logs_to_the_active_run_at_the_global_step(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from test_wandb import offline_run, settled_history

    from amptrain.compat import AmpWandbCallback

    monkeypatch.chdir(tmp_path)  # W&B's default folder is the working directory of its setup
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    run = wandb.init(project="p", dir=str(tmp_path))
    callback = AmpWandbCallback(enabled=True, precision="16")  # the original's arguments
    assert callback.enabled is True and callback.precision == "16"
    late = AmpWandbCallback(enabled=True, precision="16")
    callbacks = [callback]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=2)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", enable_checkpointing=False, logger=False,
                         callbacks=callbacks, plugins=[plugin], enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)  # fmt: skip
    callbacks.append(late)  # the original's defect: appended after the Trainer was built
    trainer.fit(make_module(pl.LightningModule), loader())
    run.finish()
    history, config = settled_history(offline_run(tmp_path), lambda h: len(h) >= 6)
    rows = sorted(history.values(), key=lambda r: r["trainer/global_step"])
    assert [r["trainer/global_step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["amp/step_skipped"] == 1 and rows[0]["amp/loss_scale"] == 2.0**23
    assert rows[-1]["amp/skipped_steps"] == callback.skipped_steps >= 1
    assert config["amp_precision"] == "16-mixed" and config["amp_enabled"] is True
    assert late.skipped_steps == 0 and late.precision == "16"  # never ran: never registered


@pytest.mark.slow
def test_without_lightning_the_module_imports_and_the_monitor_explains():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None  # not importable\n"
        "import amptrain.compat, amptrain.metrics.wandb_sink\n"
        "import amptrain.integrations.lightning as m\n"
        "extras = ('wandb', 'optuna', 'transformers', 'matplotlib', 'pandas')\n"
        "print([k for k, v in sys.modules.items() if v and k.split('.')[0] in extras])\n"
        "try:\n    m.AmpMonitor()\nexcept ModuleNotFoundError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, message = out.stdout.splitlines()
    assert loaded == "[]"  # importing the compat layer and the sinks pulls in no extra
    assert "pip install 'amptrain[lightning]'" in message


@pytest.mark.gpu
def test_fp16_mixed_on_cuda_is_logged_with_its_scaler(tmp_path):
    monitor = AmpMonitor(requested="fp16")
    _, rows, hparams = run(pl, tmp_path, 3, monitor, precision="16-mixed", accelerator="cuda")
    assert "amp/precision: 16-mixed" in hparams and float(rows[-1]["amp/loss_scale"]) > 1
