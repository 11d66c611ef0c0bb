"""What goes into a checkpoint from the training objects, and back into fresh ones.

`capture` takes the model, optimizer, scheduler, loss scale, counters and every rank's
generator states; `check_resumable` checks a checkpoint against the model and precision before
anything is changed; `restore` puts it back so the run continues bit for bit. The files
themselves (atomic, streamed, verified) are `checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import lora, rng
from amptrain.checkpoint import TRANSIENT, Checkpoint, CheckpointError
from amptrain.optim import load_state_keeping_impl

log = logging.getLogger("amptrain")


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng.state` saved; a missing source is an error, never silently skipped.

    Args:
        state: The saved generator states.
        device: The device this run trains on (its CUDA generator gets the saved one).
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise CheckpointError(f"rng.pt lacks the generator state of {missing}; cannot resume")
    rng.restore(state, device)


def module_state(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint keeps of the model: its state dict, or a LoRA model's adapters only.

    A LoRA run's frozen base is rebuilt from where it came from (the model, `--init-from`),
    so its checkpoints hold the adapters, and the optimizer state holds theirs alone.
    """
    return lora.trainable_state(model) if lora.is_lora(model) else model.state_dict()


def restore_module(model: nn.Module, state: dict[str, Any], where: Path) -> None:
    """`load_state_dict`, with a readable error listing differences of keys and shapes."""
    check_module(model, state, where)
    model.load_state_dict(state, strict=not lora.is_lora(model))


def check_module(model: nn.Module, state: dict[str, Any], where: Path) -> None:
    """Refuse a state dict whose keys or shapes differ from the model's, listing them."""
    own = module_state(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {where} does not fit this model: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}, shape mismatches {shapes[:10]}"
        )


def capture(model, optimizer, scheduler, precision, state, rngs=None) -> tuple[dict, dict]:
    """The tensors and counters of a training run, ready for `save`.

    `rngs` is every rank's `rng.state()` in rank order (this process's alone by default).
    """
    return capture_states(module_state(model), optimizer.state_dict(), scheduler, precision,
                          state, rngs)  # fmt: skip


def capture_states(
    model_state, optimizer_state, scheduler, precision, state, rngs=None
) -> tuple[dict, dict]:
    """`capture` of given model and optimizer state dicts (gathered from shards, say)."""
    tensors = {
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "scaler": precision.state_dict(),
        "rng": {"ranks": rngs if rngs is not None else [rng.state()]},
    }
    return tensors, counters(state, precision)


def counters(state, precision) -> dict[str, Any]:
    """The JSON counters of a run's `TrainState` for `trainer.json`, with its precision."""
    values = {k: v for k, v in dataclasses.asdict(state).items() if k not in TRANSIENT}
    return {**values, "precision": precision.name, "precision_reason": precision.reason}


def _rank_rng(saved: dict[str, Any], where: Path) -> dict[str, Any]:
    from amptrain.distributed import world

    rank, size = world()
    ranks = saved.get("ranks")
    if not isinstance(ranks, list) or not ranks:
        raise CheckpointError(f"{where}/rng.pt holds no per-rank generator states; cannot resume")
    if len(ranks) != size:  # resharded: the data order is kept, in-model randomness is not
        log.warning(
            "%s holds %d ranks' generator states and this run has %d; rank %d takes rank %d's: "
            "dropout and other in-model randomness will not repeat the uninterrupted run",
            where, len(ranks), size, rank, rank % len(ranks),
        )  # fmt: skip
    return ranks[rank % len(ranks)]


def check_resumable(ckpt: Checkpoint, model, precision, allow_new_scaler: bool = False) -> None:
    """Every reason `restore` would refuse `ckpt`, checked without changing anything.

    A resumed run calls this before it touches any file of the run, so a refusal leaves the
    run exactly as it was.

    Another number of processes is not refused here: `resharding.keep_global_batch` decides
    whether the run can keep its global batch on it. The shapes of a sharded checkpoint are
    checked by DCP as it loads.

    Raises:
        CheckpointError: A scaler missing for fp16, other keys or shapes than the model's,
            or no generator states.
    """
    scaler = ckpt.tensors["scaler"]
    if precision.scaler.is_enabled() and not scaler.get("enabled") and not allow_new_scaler:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was trained in {scaler.get('name', 'another precision')} "
            f"and has no GradScaler state for {precision.name}; resume in "
            f"{scaler.get('name')} or pass --allow-new-scaler to start a fresh loss scale"
        )
    if not ckpt.sharded:
        check_module(model, ckpt.tensors["model"], ckpt.path)
    ranks = ckpt.tensors["rng"].get("ranks")
    if not isinstance(ranks, list) or not ranks:
        raise CheckpointError(f"{ckpt.path}/rng.pt holds no per-rank generator states")


def restore(
    ckpt: Checkpoint, model, optimizer, scheduler, precision, state, allow_new_scaler: bool = False
) -> None:
    """Put a checkpoint back into fresh training objects, so the run continues bit for bit.

    Every check of `check_resumable` comes first, so a refusal changes nothing.
    """
    check_resumable(ckpt, model, precision, allow_new_scaler)
    restore_scaler(ckpt, precision, allow_new_scaler)
    restore_module(model, ckpt.tensors["model"], ckpt.path)
    load_state_keeping_impl(optimizer, ckpt.tensors["optimizer"])  # still fused after a resume
    restore_counters(ckpt, scheduler, state, next(model.parameters()).device)


def restore_scaler(ckpt: Checkpoint, precision, allow_new_scaler: bool = False) -> None:
    """The GradScaler state, or a refusal when fp16 resumes a checkpoint that has none."""
    scaler = ckpt.tensors["scaler"]
    if precision.scaler.is_enabled() and not scaler.get("enabled"):
        if not allow_new_scaler:
            raise CheckpointError(
                f"checkpoint {ckpt.path} was trained in {scaler.get('name', 'another precision')} "
                f"and has no GradScaler state for {precision.name}; resume in "
                f"{scaler.get('name')} or pass --allow-new-scaler to start a fresh loss scale"
            )
        log.warning("resuming %s with a fresh GradScaler (allow_new_scaler)", precision.name)
    else:
        precision.load_state_dict(scaler)


def restore_counters(
    ckpt: Checkpoint, scheduler, state, device: torch.device | None = None
) -> None:
    """The schedule, this rank's generator states (`device`: the run's) and the run's counters."""
    scheduler.load_state_dict(ckpt.tensors["scheduler"])
    set_rng_state(_rank_rng(ckpt.tensors["rng"], ckpt.path), device)
    for field in dataclasses.fields(state):
        if field.name in ckpt.trainer and field.name not in TRANSIENT:
            setattr(state, field.name, ckpt.trainer[field.name])
