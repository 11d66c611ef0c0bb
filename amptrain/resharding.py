"""Checkpoints that reshard, resuming on another number of processes, and switching strategy.

A checkpoint is written in one of two formats (`FitOptions.checkpoint_format`): `sharded`,
the default under FSDP, and `full`, the default otherwise. A sharded checkpoint is written
with `torch.distributed.checkpoint` (DCP): every rank writes its own shards of the model and
optimizer state into the checkpoint's temporary directory (under DDP, where every rank holds
the same state, DCP's planner has each tensor written once), then rank 0 adds the schedule,
loss scale, every rank's generator states and the counters, hashes everything into the
manifest and renames the directory into place, as `checkpoint.save` does for a full
checkpoint. A full checkpoint is rank 0's `torch.save` files, gathered from the shards first
under FSDP. Either way a half-written checkpoint is never the newest.

DCP records each tensor's global shape and every shard's place, so a sharded checkpoint loads
into any number of processes: sharded over 2 or 4 ranks, or whole (DDP, one process). A full
checkpoint loads whole, or into an FSDP run, each rank keeping its own slices of it; both
formats name the parameters alike (FSDP2 keeps the model's own names), so a run can switch
between `ddp` and `fsdp` when it resumes.

The data position is counted in global batches (`data.batches`), so a resumed run continues
the same global batch sequence when the global batch (processes x `batch_size`) is kept. A
resume on another number of processes keeps it by setting the per-process batch to the
saved global batch divided by the new number of processes; where that does not divide, or a
given batch size would change the global batch, the resume is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import checkpoint, checkpoint_state, distributed, sharding
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


def writes_shards(checkpoint_format: str, sharded: bool) -> bool:
    """True when a run writes sharded (DCP) checkpoints; `sharded`: its model is sharded.

    `auto` (`FitOptions.checkpoint_format`) is `sharded` under FSDP, `full` otherwise.
    """
    return checkpoint_format == "sharded" or (checkpoint_format == "auto" and sharded)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's order: the ids of `optimizer.state_dict()`."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An `optimizer.state_dict()` keyed by parameter name, as DCP's `set_state_dict` takes."""
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                         for g in state["param_groups"]],
    }  # fmt: skip


def _by_id(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `_by_name`: an optimizer state keyed as `optimizer.state_dict()` keys it."""
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                         for g in state["param_groups"]],
    }  # fmt: skip


def capture_full(model, optimizer, scheduler, precision, state, rngs) -> tuple[dict, dict] | None:
    """The tensors and counters of a full checkpoint, on rank 0; None on the other ranks.

    A sharded model's state is gathered first (collective: every rank calls), into the
    layout a model and optimizer in one process have, so the checkpoint is the same whichever
    strategy wrote it.
    """
    if not sharding.is_sharded(model):
        if not distributed.is_main():
            return None
        return checkpoint_state.capture(model, optimizer, scheduler, precision, state, rngs)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    if not distributed.is_main():
        return None
    optimizer_state = _by_id(optimizer_state, _names(model, optimizer))
    return checkpoint_state.capture_states(
        model_state, optimizer_state, scheduler, precision, state, rngs
    )


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
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _one_process_allowed():
            dcp.save(_state(model, optimizer), checkpoint_id=staged / checkpoint.SHARDS)
    except (Exception, CheckpointException) as exc:  # DCP's: a BaseException, on every rank
        if distributed.is_main():
            shutil.rmtree(staged, ignore_errors=True)
        free = shutil.disk_usage(root).free / 2**20
        raise distributed.said_by_rank_0(CheckpointWriteError(
            f"could not write the shards of checkpoint step-{state.step:09d} in {root} "
            f"({_first_failure(exc)}; {free:.1f} MiB free there); earlier checkpoints are "
            "untouched"
        )) from None  # fmt: skip
    distributed.barrier()  # every rank's shards are on disk before rank 0 seals the directory
    path = None
    if distributed.is_main():
        tensors = {"scheduler": scheduler.state_dict(), "scaler": precision.state_dict(),
                   "rng": {"ranks": rngs}}  # fmt: skip
        trainer = {**checkpoint_state.counters(state, precision), **meta}
        path = checkpoint.save(root, state.step, tensors, trainer, keep_last, staged=staged)
        log.debug("sharded checkpoint %s saved", path)
    return Path(distributed.broadcast(str(path) if path else None))


def _first_failure(exc: BaseException) -> str:
    """The first rank's own error inside DCP's CheckpointException (whose text is tracebacks)."""
    failures = getattr(exc, "failures", None) or {}
    where = ""
    if failures:  # an OSError (ENOSPC) says more than torch's zip writer's assertion
        rank = min(failures, key=lambda r: (not isinstance(failures[r][0], OSError), r))
        exc, where = failures[rank][0], f"rank {rank}: "
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{where}{type(exc).__name__}: {text}"


@contextlib.contextmanager
def _one_process_allowed() -> Iterator[None]:
    """DCP without a process group: one process writing or reading every shard is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def restore(
    ckpt: Checkpoint, model, optimizer, scheduler, precision, state, allow_new_scaler: bool
) -> None:
    """Put a full or a sharded checkpoint back, into a sharded or a whole model.

    Raises:
        CheckpointError: If the checkpoint does not fit this model and optimizer.
    """
    if not ckpt.sharded:
        if sharding.is_sharded(model):
            _restore_full_into_shards(ckpt, model, optimizer, scheduler, precision, state,
                                      allow_new_scaler)  # fmt: skip
        else:
            checkpoint_state.restore(ckpt, model, optimizer, scheduler, precision, state,
                               allow_new_scaler)  # fmt: skip
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    checkpoint_state.restore_scaler(ckpt, precision, allow_new_scaler)
    saved = _state(model, optimizer)
    try:
        with _one_process_allowed():
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
    checkpoint_state.restore_counters(ckpt, scheduler, state, _device(model))


def _restore_full_into_shards(
    ckpt: Checkpoint, model, optimizer, scheduler, precision, state, allow_new_scaler: bool
) -> None:
    """A full checkpoint into a sharded model: every rank keeps its own slices of each tensor.

    Every rank has loaded the whole checkpoint; DCP's `set_state_dict` with full state dicts
    cuts each rank's shards out of the whole tensors.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    checkpoint_state.check_resumable(ckpt, model, precision, allow_new_scaler)
    checkpoint_state.restore_scaler(ckpt, precision, allow_new_scaler)
    options = StateDictOptions(full_state_dict=True)
    saved = _by_name(ckpt.tensors["optimizer"], _names(model, optimizer))

    def load(optimizer_state: dict[str, Any]) -> None:
        set_state_dict(model, optimizer, model_state_dict=ckpt.tensors["model"],
                       optim_state_dict=optimizer_state, options=options)  # fmt: skip

    load_state_keeping_impl(optimizer, saved, load)
    checkpoint_state.restore_counters(ckpt, scheduler, state, _device(model))
