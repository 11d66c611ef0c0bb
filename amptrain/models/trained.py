"""Trained models: a run directory used as a model, and weights loaded into a built model.

A `train` run directory holds what rebuilds its model: `config.json` (the model source, its
arguments, the context and the tokenizer) and `model.pt` (the final weights; without it, the
newest complete checkpoint). So `--model runs/train-XYZ` means "that run's model, tokenizer
and final weights" for every command, and `--init-from` takes a run directory, a checkpoint
directory or a `model.pt` file. Weights are always loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from amptrain import checkpoint
from amptrain.errors import ModelError

log = logging.getLogger("amptrain")


def run_config(path: str | Path) -> dict[str, Any] | None:
    """The saved settings if `path` is an amptrain run directory, else None."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        saved = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return None
    is_run = isinstance(saved, dict) and {"model", "fit", "context"} <= set(saved)
    return saved if is_run else None


def run_tokenizer(saved: dict[str, Any]) -> str | None:
    """The tokenizer.json a run trained with: its `--tokenizer`, or its model directory's."""
    if saved.get("tokenizer"):
        return saved["tokenizer"]
    nested = run_config(saved["model"])
    if nested is not None:
        return run_tokenizer(nested)
    candidate = Path(saved["model"]) / "tokenizer.json"
    return str(candidate) if candidate.is_file() else None


def weights(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The model state dict at `path` and the file or directory it came from.

    Raises:
        FileNotFoundError: If nothing is there, or a run has neither model.pt nor a checkpoint.
        CheckpointError: If a checkpoint is incomplete or holds anything but tensors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.is_file():
        return checkpoint.safe_torch_load(path), path
    if (path / "model.pt").is_file():
        return checkpoint.safe_torch_load(path / "model.pt"), path / "model.pt"
    if (path / "checkpoints").is_dir():
        newest = checkpoint.latest(path / "checkpoints")
        if newest is None:
            raise FileNotFoundError(f"{path} has no model.pt and no complete checkpoint")
        path = newest
    return checkpoint.load(path).tensors["model"], path


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights at `path` into `model`, which must have the same keys and shapes.

    Raises:
        CheckpointError: Listing missing and unexpected keys and shape mismatches.
    """
    state, where = weights(path)
    if not isinstance(state, dict):
        raise ModelError(f"{where} holds a {type(state).__name__}, not a model state dict")
    checkpoint.restore_module(model, state, where)
    log.info("loaded weights from %s", where)
    return model
