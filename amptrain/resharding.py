"""Checkpoints that reshard, and resuming on another number of processes.

A sharded (FSDP) run checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes
its own shards of the model and optimizer state into the checkpoint's temporary directory,
then rank 0 adds the schedule, loss scale, every rank's generator states and the counters,
hashes everything into the manifest and renames the directory into place, as
`checkpoint.save` does for a whole checkpoint. A half-written checkpoint is never the newest.

DCP records each tensor's global shape and every shard's place, so a checkpoint loads into
any number of processes: sharded over 2 or 4 ranks, or whole in one process.

The data position is counted in global batches (`data.batches`), so a resumed run continues
the same global batch sequence when the global batch (processes x `batch_size`) is kept. A
resume on another number of processes keeps it by setting the per-process batch to the
saved global batch divided by the new number of processes; where that does not divide, or a
given batch size would change the global batch, the resume is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import checkpoint, distributed, sharding
from amptrain.checkpoint import Checkpoint, CheckpointError, CheckpointWriteError
from amptrain.config import FitOptions
from amptrain.optim import load_state_keeping_impl

log = logging.getLogger("amptrain")


def keep_global_batch(opts: FitOptions, ckpt: Checkpoint | None, world_size: int) -> FitOptions:
    """`opts` with the per-process batch that keeps the checkpoint's global batch.

    Raises:
        CheckpointError: If the global batch cannot be kept on `world_size` processes, or
            the checkpoint does not record its batch size (written before resharding).
    """
    saved_world = 1 if ckpt is None else ckpt.trainer.get("world_size", 1)
    if ckpt is None or saved_world == world_size:
        return opts
    saved_batch = ckpt.trainer.get("batch_size")
    if not isinstance(saved_batch, int):
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written by {saved_world} process(es) and this run has "
            f"{world_size}; it does not record its batch size, so the global batch cannot be "
            f"kept: resume with --nproc {saved_world}"
        )
    total = saved_world * saved_batch
    if opts.batch_size * world_size == total:
        return opts
    if opts.batch_size != saved_batch or total % world_size:
        raise CheckpointError(
            f"checkpoint {ckpt.path} trained with a global batch of {total} ({saved_world} "
            f"process(es) x batch_size {saved_batch}); {world_size} process(es) x batch_size "
            f"{opts.batch_size} would change the training: resume on a number of processes "
            f"that divides {total}"
        )
    log.info("resuming on %d process(es): batch_size %d per process keeps the global batch %d",
             world_size, total // world_size, total)  # fmt: skip
    return dataclasses.replace(opts, batch_size=total // world_size)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save(
    root: str | Path, model, optimizer, scheduler, precision, state, rngs, meta, keep_last: int
) -> Path:
    """Write a sharded checkpoint of `state.step` (collective: every rank calls it).

    Raises:
        CheckpointWriteError: If a rank could not write its shards; earlier checkpoints are
            untouched.
    """
    import torch.distributed.checkpoint as dcp

    staged = checkpoint.staging_dir(root, state.step)
    if distributed.is_main():
        Path(root).mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(mode=0o700)
    distributed.barrier()
    try:
        dcp.save(_state(model, optimizer), checkpoint_id=staged / checkpoint.SHARDS)
    except Exception as exc:  # DCP raises one CheckpointException on every rank
        if distributed.is_main():
            shutil.rmtree(staged, ignore_errors=True)
        raise CheckpointWriteError(
            f"could not write the shards of checkpoint step-{state.step:09d} in {root}: "
            f"{str(exc).splitlines()[0]}; earlier checkpoints are untouched"
        ) from exc
    distributed.barrier()  # every rank's shards are on disk before rank 0 seals the directory
    path = None
    if distributed.is_main():
        tensors = {"scheduler": scheduler.state_dict(), "scaler": precision.state_dict(),
                   "rng": {"ranks": rngs}}  # fmt: skip
        trainer = {**checkpoint.counters(state, precision), **meta}
        path = checkpoint.save(root, state.step, tensors, trainer, keep_last, staged=staged)
        log.debug("sharded checkpoint %s saved", path)
    return Path(distributed.broadcast(str(path) if path else None))


def check_layout(ckpt: Checkpoint | None, sharded: bool) -> None:
    """Refuse a whole checkpoint for a sharded run (`sharded`), before anything is loaded.

    Raises:
        CheckpointError: Naming the checkpoint, its strategy and the fix.
    """
    if ckpt is not None and sharded and not ckpt.sharded:
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds the whole model (strategy "
            f"{ckpt.trainer.get('strategy', 'ddp')!r}); a sharded run resumes from sharded "
            "checkpoints only: resume it with strategy 'ddp'"
        )


def restore(
    ckpt: Checkpoint, model, optimizer, scheduler, precision, state, allow_new_scaler: bool
) -> None:
    """Put a whole or a sharded checkpoint back, into a sharded or a whole model.

    Raises:
        CheckpointError: If a sharded model is given a whole checkpoint, or the shards do not
            fit this model and optimizer.
    """
    if not ckpt.sharded:
        check_layout(ckpt, sharding.is_sharded(model))
        checkpoint.restore(ckpt, model, optimizer, scheduler, precision, state, allow_new_scaler)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    checkpoint.restore_scaler(ckpt, precision, allow_new_scaler)
    saved = _state(model, optimizer)
    try:
        with warnings.catch_warnings():  # one process loading every shard is the intent here
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(saved, checkpoint_id=ckpt.path / checkpoint.SHARDS,
                     no_dist=distributed.world()[1] == 1)  # fmt: skip
    except Exception as exc:  # a key or shape that differs
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit this model and optimizer: "
            f"{str(exc).splitlines()[0]}"
        ) from None

    def load(optimizer_state: dict[str, Any]) -> None:
        set_state_dict(model, optimizer, model_state_dict=saved["model"],
                       optim_state_dict=optimizer_state)  # fmt: skip

    load_state_keeping_impl(optimizer, saved["optimizer"], load)
    checkpoint.restore_counters(ckpt, scheduler, state)
