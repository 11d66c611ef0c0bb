"""One training step measured for memory: what `memory_plan` and `largest` ask of a size.

A probe on the CPU runs in a forked process (`hardware.measure_memory`) that volunteers to the
kernel's OOM killer first, so a micro-batch too large for the machine kills the probe and not
the run. On CUDA the step runs in the process with the learning rate at zero (the weights do not
move; bf16 weights' matrices are left rounded to bf16, as the run rounds them at its start) and
an out-of-memory error means it does not fit. The probe's step is eager: a compiled
step holds no more, except under checkpointing on torch 2.13 (see `recompute`).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from collections.abc import Callable

import torch
from torch import nn

from amptrain import data as data_mod
from amptrain import hardware, low_weights, recompute
from amptrain.blocks import repeated_blocks
from amptrain.compiling import eager_loss
from amptrain.config import FitOptions
from amptrain.optim import make_optimizer
from amptrain.precision import Precision


def probe_step(
    model: nn.Module,
    blocks: data_mod.Blocks,
    prec: Precision,
    opts: FitOptions,
    micro: int,
    mode: str,
    depth: int | None = None,
) -> float | None:
    """The peak bytes of one training step on `micro` blocks, or None if it ran out.

    With `depth`, the step runs with the model's stack of repeated blocks replaced by `depth`
    copies of its first block (built inside the probe, so that they count in its peak; on CPU
    the model's own blocks are let go there).

    Raises:
        Unrun: With `depth`, when the model's forward does not run all the copies.
    """
    device = next(model.parameters()).device
    x, y = blocks.take(slice(0, micro))
    probe_opts = dataclasses.replace(opts, activation_checkpointing=mode)

    def step() -> None:
        restore = lowered = checkpointed = None
        try:
            restore = deepen(model, depth, keep=device.type != "cpu") if depth else None
            lowered = low_weights.cast(model, probe_opts.weights)
            checkpointed = recompute.apply(model, mode)
            optimizer = make_optimizer(model, probe_opts)
            for group in optimizer.param_groups:
                group["lr"] = 0.0  # the weights stay as they are
            with prec.autocast():
                eager_loss(opts.ignore_index)(model, x.to(device), y.to(device)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del optimizer
        finally:
            if checkpointed is not None:
                checkpointed.undo()
            if lowered is not None:
                lowered.undo()
            if restore is not None:
                restore()

    try:
        peak, _, _ = hardware.measure_memory(device, step, oom_first=True)
    except (torch.OutOfMemoryError, hardware.WorkerKilled, MemoryError):
        peak = None
    finally:
        if device.type == "cuda":
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    return None if peak is None else peak * 2**20


class Unrun(RuntimeError):
    """A deepened model's forward left some of its blocks out (it counts them from its config)."""


def deepen(model: nn.Module, depth: int, keep: bool = True) -> Callable[[], None]:
    """Replace the model's repeated blocks by `depth` copies of its first; returns the undo.

    The forward that follows raises `Unrun` (through a hook) unless every copy ran. With
    `keep=False` (a forked probe, which ends after) the model's own blocks are let go and the
    undo does not put them back.
    """
    found = repeated_blocks(model)
    assert found is not None, "largest_depth checks for the blocks"
    parent_name, _, name = found.path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    copies = [copy.deepcopy(found.blocks[0]) for _ in range(depth)]
    ran: set[int] = set()
    hooks = [b.register_forward_hook(lambda m, i, o: ran.add(id(m))) for b in copies]
    stack = nn.Sequential(*copies) if isinstance(found.container, nn.Sequential) else (
        nn.ModuleList(copies))  # fmt: skip
    setattr(parent, name, stack)
    original = found.container if keep else None
    del found
    hooks.append(model.register_forward_hook(
        lambda m, i, o: None if len(ran) == depth else _raise_unrun(depth - len(ran))))  # fmt: skip

    def undo() -> None:
        for hook in hooks:
            hook.remove()
        if original is not None:
            setattr(parent, name, original)

    return undo


def _raise_unrun(missing: int) -> None:
    raise Unrun(f"{missing} of the added blocks did not run")
