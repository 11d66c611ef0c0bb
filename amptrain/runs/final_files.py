"""The files a training run writes last, each failure one line naming what is kept.

The final weights come first (`save_weights`: what a full disk spares), `hf/` is an
after-step whose failure is a warning (`export`); a LoRA run first writes its PEFT adapter
folder (`save_adapter`) and merges the adapters into the base (`merged`), whose weights are
then the run's as any other's.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from amptrain import checkpoint, lora
from amptrain.errors import EnvironmentFailure
from amptrain.models.trained import WEIGHTS
from amptrain.runs import atomic_safetensors_save
from amptrain.runs.hf_export import export_hf

log = logging.getLogger("amptrain")

ADAPTER_DIR = "adapter"
"""A LoRA run's PEFT adapter folder, beside the merged weights."""


def save_adapter(model: nn.Module, run_dir: Path) -> None:
    """`adapter/`, the PEFT adapter folder, replaced whole (a resumed run writes it again)."""
    target = run_dir / ADAPTER_DIR
    tmp = run_dir / f".{ADAPTER_DIR}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        lora.save_adapter(model, tmp)
        old = run_dir / f".{ADAPTER_DIR}.old.tmp-{os.getpid()}"  # a killed run's is cleaned
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old.exists():
                os.replace(old, target)  # the previous adapters stay where they were
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        newest = checkpoint.latest(run_dir / "checkpoints")
        raise EnvironmentFailure(
            f"could not write the LoRA adapters {target} ({exc.strerror or exc}); the trained "
            f"adapters are in checkpoint {newest.name if newest else '(none)'}: free space, "
            "then --resume auto writes them"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merged(model: nn.Module, run_dir: Path) -> nn.Module:
    """The adapters merged into the base in fp32, on the CPU (never the device's memory).

    Raises:
        EnvironmentFailure: Out of host memory, naming the adapter folder, which is written.
    """
    try:
        return lora.merged(model.cpu())
    except (MemoryError, RuntimeError) as exc:  # torch's CPU allocator raises RuntimeError
        if isinstance(exc, RuntimeError) and "allocate" not in str(exc):
            raise
        raise EnvironmentFailure(
            f"out of memory merging the LoRA adapters into an fp32 copy of the base; the "
            f"adapters are saved in {run_dir / ADAPTER_DIR} (PeftModel.from_pretrained loads "
            "them onto the base)"
        ) from None


def save_weights(weights: dict[str, Any], run_dir: Path) -> None:
    """The final model.safetensors; a failed write names it and what still holds the weights."""
    try:
        atomic_safetensors_save(weights, run_dir / WEIGHTS)
    except (OSError, MemoryError) as exc:
        newest = checkpoint.latest(run_dir / "checkpoints")
        short = "memory" if isinstance(exc, MemoryError) else "space"
        kept = (f"the trained state is in checkpoint {newest.name}: free {short}, then "
                f"--resume auto writes it" if newest else "no checkpoint holds it")  # fmt: skip
        why = "out of memory" if isinstance(exc, MemoryError) else exc.strerror or exc
        raise EnvironmentFailure(
            f"could not write the final weights {run_dir / WEIGHTS} ({why}); {kept}"
        ) from None


def export(model: nn.Module, run_dir: Path, tokenizer: str | None, weights: dict[str, Any]) -> None:
    """hf/, an after-step: when it fails the run is still complete in model.safetensors."""
    try:
        export_hf(model, run_dir, tokenizer, state_dict=weights)
    except Exception as exc:  # noqa: BLE001 - e.g. a model transformers cannot serialise
        log.warning("hf/ not written (%s: %s); the run's weights are saved in %s",
                    type(exc).__name__, exc, WEIGHTS)  # fmt: skip
