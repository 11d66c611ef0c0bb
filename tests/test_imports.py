from __future__ import annotations

import subprocess
import sys

import pytest

from amptrain import _imports

EXTRAS = ("wandb", "optuna", "lightning", "pytorch_lightning", "transformers", "matplotlib",
          "pandas", "tokenizers", "tensorboard", "mlflow", "psycopg", "sqlalchemy")  # fmt: skip


def test_import_amptrain_pulls_in_no_optional_extra():
    code = (
        "import sys, amptrain, amptrain.train, amptrain.cli, amptrain.cli.demo, amptrain.search\n"
        "import amptrain.metrics.tensorboard_sink, amptrain.metrics.mlflow_sink\n"
        f"print([m for m in sys.modules if m.split('.')[0] in {EXTRAS!r}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_requires_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(_imports, "MATPLOTLIB_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'amptrain\[plot\]'.*metrics.csv"):
        _imports.requires("matplotlib", "plot", "loss plots", "read metrics.csv instead")


def test_training_without_matplotlib_skips_the_plot_only(monkeypatch, tmp_path):
    from amptrain import train
    from amptrain.config import FitOptions, TrainConfig

    monkeypatch.setattr(train, "MATPLOTLIB_AVAILABLE", False)
    cfg = TrainConfig(context=16, model_kwargs={"n_layer": 1, "n_embd": 16, "n_head": 2},
                      out=str(tmp_path), fit=FitOptions(max_steps=1, batch_size=2))  # fmt: skip
    run = train.run_training(cfg)
    names = {p.name for p in run.run_dir.iterdir()}
    assert "loss.png" not in names and "summary.json" in names
