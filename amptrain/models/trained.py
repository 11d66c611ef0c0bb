"""Trained models: a run directory used as a model, and weights loaded into a built model.

A `train` run directory holds what rebuilds its model: `config.json` (the model source, its
arguments, the context and the tokenizer), `base.json` (the base model's absolute path and
hash, see `provenance`), `tokenizer.json` (a copy of the tokenizer it trained with) and
`model.safetensors` (the final weights). Runs of earlier versions have `model.pt` instead;
without either, the newest complete checkpoint is used. So `--model runs/train-XYZ` means "that
run's model, tokenizer and final weights" for every command, and `--init-from` takes a run
directory, a checkpoint directory, a `.safetensors` file or a `.pt` file.

Weights are read as safetensors (tensors only, by construction) or with
`torch.load(weights_only=True)`; a file that is neither, or holds anything but named tensors,
is refused in one line naming it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import checkpoint, checkpoint_state
from amptrain.errors import ModelError

log = logging.getLogger("amptrain")

WEIGHTS = "model.safetensors"
"""The final weights of a run, written by every `train` run."""
LEGACY_WEIGHTS = "model.pt"
"""The final weights of runs written before safetensors; still read."""
# A torch.save file is a zip archive (or, before torch 1.6, a pickle of protocol 2+).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


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


def run_tokenizer(run_dir: str | Path) -> str | None:
    """The tokenizer.json a run trained with: its own copy, else where it was (older runs)."""
    run_dir = Path(run_dir)
    if (run_dir / "tokenizer.json").is_file():
        return str(run_dir / "tokenizer.json")
    saved = run_config(run_dir)
    if saved is None:
        return None
    if saved.get("tokenizer"):
        return saved["tokenizer"]
    if run_config(saved["model"]) is not None:
        return run_tokenizer(saved["model"])
    candidate = Path(saved["model"]) / "tokenizer.json"
    return str(candidate) if candidate.is_file() else None


def weights_file(run_dir: str | Path) -> Path | None:
    """The final weights file of a run directory, or None when it has none.

    Raises:
        ModelError: If it has both `model.safetensors` and `model.pt`: which one is meant is
            not for amptrain to guess.
    """
    found = [Path(run_dir) / n for n in (WEIGHTS, LEGACY_WEIGHTS) if (Path(run_dir) / n).exists()]
    if len(found) > 1:
        raise ModelError(
            f"{run_dir} holds both {WEIGHTS} and {LEGACY_WEIGHTS}, so which are its weights is "
            f"ambiguous; remove the one that is not ({WEIGHTS} is what amptrain writes)"
        )
    return found[0] if found else None


def weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The model state dict at `path` and the file or directory it came from.

    Raises:
        FileNotFoundError: If nothing is there.
        ModelError: If a run has no weights, or a file is unreadable or holds no state dict.
        CheckpointError: If a checkpoint is incomplete or holds anything but tensors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.is_file():
        return read_weights(path), path
    found = weights_file(path)
    if found is not None:
        return read_weights(found), found
    if (path / "checkpoints").is_dir():
        newest = checkpoint.latest(path / "checkpoints")
        if newest is None:
            raise ModelError(
                f"{path} has no {WEIGHTS}, no {LEGACY_WEIGHTS} and no complete "
                "checkpoint; train it again, or resume it if it was interrupted"
            )
        path = newest
    elif not (path / "manifest.json").is_file():
        raise ModelError(
            f"{path} holds no weights: no {WEIGHTS}, no {LEGACY_WEIGHTS}, no checkpoints/ and "
            "it is not a checkpoint directory; give a run directory of amptrain train, a "
            "checkpoint directory, or a .safetensors or .pt file"
        )
    state = _state_dict(checkpoint.load(path).tensors["model"], path)
    if state and all(".lora_" in key for key in state):
        raise ModelError(
            f"{path} holds LoRA adapters only (the run stopped before it merged them into "
            f"{WEIGHTS}); resume the run (amptrain train --resume) to write its weights"
        )
    return state, path


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The named tensors of a `.safetensors` file, or of a `torch.save` file (weights only).

    Raises:
        ModelError: If the file is unreadable, of neither format, or holds no state dict.
        CheckpointError: If a `torch.save` file holds objects other than tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _state_dict(_read_safetensors(path), path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:  # a folder or an unreadable file where the weights should be
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head.startswith(_TORCH_MAGIC):
        raise ModelError(
            f"cannot read {path}: it is not a PyTorch weights file (a torch.save archive); "
            "give the model.safetensors or model.pt that amptrain train wrote"
        )
    try:
        state = checkpoint.safe_torch_load(path)
    except checkpoint.CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any damage inside the archive, in one line
        raise ModelError(f"cannot read {path}: {type(exc).__name__}: {exc}; the file is "
                         "damaged, write it again") from None  # fmt: skip
    return _state_dict(state, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Its tensors, with the tied names the writer stored once restored from the metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot read {path}: it is not a valid safetensors file ({exc}); "
                         "the file is damaged, write it again") from None  # fmt: skip
    for alias, kept in metadata.items():  # {"lm_head.weight": "wte.weight"}, see runs
        if alias not in state and kept in state:
            state[alias] = state[kept]
    return state


def _state_dict(state: Any, where: Path) -> dict[str, torch.Tensor]:
    """`state` if it maps names to tensors, else a one-line refusal naming `where`."""
    if not isinstance(state, dict) or not state:
        what = "an empty dict" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ModelError(f"{where} holds {what}, not a model state dict (names to tensors)")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise ModelError(
            f"{where} is not a model state dict: {bad[:3]} map to "
            f"{type(state[bad[0]]).__name__}, not tensors"
        )
    return state


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights at `path` into `model`, which must have the same keys and shapes.

    Raises:
        CheckpointError: Listing missing and unexpected keys and shape mismatches.
        ModelError: If the weights cannot be read (see `weights`).
    """
    state, where = weights(path)
    checkpoint_state.restore_module(model, state, where)
    log.info("loaded weights from %s", where)
    return model
