"""What a run holds in memory, and a micro-batch that fits a budget with the global batch kept.

`footprint` counts the bytes the weights, their gradients and the optimizer state take under
the run's levers (fp32 masters and AdamW: 16 bytes a parameter; bf16 weights with Kahan
summation 10, with stochastic rounding or none 8, and 6 with 8-bit moments; 8-bit AdamW
moments 2 bytes instead of 8; frozen
parameters their own size), so the preflight refuses a model whose state alone cannot fit.

`plan` answers `micro_batch="auto"`: the batch each process steps on (`batch_size` x
`grad_accum`) is split into the largest micro-batch whose training step fits the memory
budget, found by measuring one step, and gradient accumulation takes the rest, so the global
batch is exactly the one asked for (the step normalises the loss by the window's token count,
so A micro-batches of B equal one batch of A*B). With `activation_checkpointing="auto"` the
blocks are checkpointed when the asked batch does not fit without it.

Each candidate is measured by `step_probe.probe_step`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn

from amptrain import data as data_mod
from amptrain import distributed, low_weights, recompute
from amptrain.blockwise8 import MIN_8BIT_SIZE, block_of
from amptrain.config import FitOptions
from amptrain.errors import ConfigError
from amptrain.precision import Precision
from amptrain.sizes import parse_size
from amptrain.step_probe import probe_step

log = logging.getLogger("amptrain")

MARGIN = 0.1
"""The share of the device's memory the default budget leaves free (the OS, other processes)."""


def budget_bytes(opts: FitOptions, device: torch.device) -> tuple[int, str]:
    """The run's memory budget per process, and where it came from."""
    if opts.memory_budget is not None:
        return parse_size(opts.memory_budget), "--memory-budget"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    have = device_memory(device) // local
    return int(have * (1 - MARGIN)), f"the device's memory less {MARGIN:.0%}"


def device_memory(device: torch.device) -> int:
    """The bytes `device` has: a GPU's memory, or the machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bytes_per_parameter(opts: FitOptions, lowered: bool, eight: bool | None = None) -> int:
    """Bytes a trainable parameter holds: weight, gradient, AdamW moments, compensation.

    `lowered`: the parameter is one `low_weights` casts to bf16 under bf16 weights. `eight`:
    its moments are 8-bit (default: whenever `optimizer_state="8bit"`, as for a large matrix).
    """
    eight = opts.optimizer_state == "8bit" if eight is None else eight
    if opts.weights == "bf16" and lowered:  # bf16 moments, or 8-bit ones
        return 2 + 2 + (2 if eight else 4) + (2 if opts.compensation == "kahan" else 0)
    return 4 + 4 + (2 if eight else 8)


def footprint(model: nn.Module, opts: FitOptions, world_size: int = 1) -> dict[str, Any]:
    """The bytes of the weights, gradients and optimizer state under `opts`' levers.

    Under FSDP each process holds its share of them.
    """
    cast = low_weights.castable(model) if opts.weights == "bf16" else set()
    trained = frozen = 0
    for param in model.parameters():
        if param.requires_grad:
            eight = opts.optimizer_state == "8bit" and _eight_bit(param, opts, world_size)
            trained += param.numel() * bytes_per_parameter(opts, id(param) in cast, eight)
        else:
            frozen += param.numel() * param.element_size()
    total = trained + frozen
    if opts.strategy == "fsdp" and world_size > 1:
        total //= world_size
    elif world_size > 1:  # DDP's buckets hold a second copy of the gradients
        total += _gradient_bytes(model, opts)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"bytes": total, "per_parameter": round(trained / max(n, 1), 2)}


def _eight_bit(param: torch.Tensor, opts: FitOptions, world_size: int) -> bool:
    """Whether `param`'s moments are 8-bit under `optimizer_state="8bit"`.

    bitsandbytes' rule (from 4,096 elements), or amptrain's blocks along rows (`blockwise8`)
    for bf16 weights and FSDP2's shards.
    """
    if opts.weights == "bf16" or (opts.strategy == "fsdp" and world_size > 1):
        return block_of(param) is not None
    return param.numel() >= MIN_8BIT_SIZE


def _gradient_bytes(model: nn.Module, opts: FitOptions) -> int:
    """The bytes of the trained parameters' gradients (bf16 for the cast matrices)."""
    cast = low_weights.castable(model) if opts.weights == "bf16" else set()
    return sum(p.numel() * (2 if id(p) in cast else 4) for p in model.parameters()
               if p.requires_grad)  # fmt: skip


def unprobed_bytes(model: nn.Module, opts: FitOptions, accumulated: int) -> int:
    """What the run holds that one probed step does not.

    The fp32 sums of accumulated bf16 gradients, and DDP's gradient buckets. (Under FSDP the
    probe measures the unsharded step, which overstates a shard's: the plan errs on the safe
    side.)
    """
    extra = 0
    if opts.weights == "bf16" and accumulated > 1:
        cast = low_weights.castable(model)
        extra += 4 * sum(p.numel() for p in model.parameters()
                         if p.requires_grad and id(p) in cast)  # fmt: skip
    if distributed.world()[1] > 1 and opts.strategy != "fsdp":
        extra += _gradient_bytes(model, opts)
    return extra


def check_footprint(model: nn.Module, opts: FitOptions, device: torch.device, source: str) -> None:
    """Refuse a run whose weights and optimizer state alone exceed the memory budget.

    Raises:
        ConfigError: Naming the bytes needed, the budget and the levers that lower it.
    """
    need = footprint(model, opts, distributed.world()[1])
    budget, whence = budget_bytes(opts, device)
    if need["bytes"] <= budget:
        return
    raise ConfigError(
        f"{source}: its weights, gradients and optimizer state take {_size(need['bytes'])} "
        f"({need['per_parameter']:g} bytes a trained parameter), more than the "
        f"{_size(budget)} budget ({whence}); lower it with --precision bf16-true (8-10 bytes), "
        "--optimizer-state 8bit, --lora, or --strategy fsdp over several processes"
    )


def _size(size: float) -> str:
    """A size in the unit that reads best: `1.50 GiB`, `12.0 MiB`, `800 KiB`."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale:
            return f"{size / scale:,.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{size / 2**10:,.0f} KiB"


def wanted(opts: FitOptions) -> bool:
    """Whether `opts` leave something for `plan` to decide."""
    return opts.micro_batch == "auto" or (
        opts.activation_checkpointing == "auto" and opts.memory_budget is not None
    )


def resumed(opts: FitOptions, trainer: dict[str, Any]) -> FitOptions:
    """`opts` with the split a checkpoint's run planned: a resume keeps its micro-batch."""
    micro = int(trainer.get("batch_size", opts.batch_size))
    per_process = opts.batch_size * opts.grad_accum
    if per_process % micro:
        raise ConfigError(
            f"the checkpoint's micro-batch {micro} does not divide this run's batch "
            f"{per_process}; resume with the batch it was trained with"
        )
    mode = trainer.get("activation_checkpointing", opts.activation_checkpointing)
    return _split(opts, micro, mode)


def plan(
    model: nn.Module, blocks: data_mod.Blocks, prec: Precision, opts: FitOptions
) -> tuple[FitOptions, dict[str, Any]]:
    """`opts` with `micro_batch="auto"` and `activation_checkpointing="auto"` decided.

    Returns the options to train with (`micro_batch=None`) and the record of the probes.

    Raises:
        ConfigError: When even a micro-batch of one does not fit the budget (with
            checkpointing, where `auto` allows it).
    """
    device = next(model.parameters()).device
    budget, whence = budget_bytes(opts, device)
    per_process = opts.batch_size * opts.grad_accum
    sizes = [m for m in range(per_process, 0, -1) if per_process % m == 0]  # largest first
    if opts.weights == "bf16" and distributed.world()[1] > 1 and opts.strategy != "fsdp":
        sizes = [per_process]  # bf16 weights cannot accumulate under DDP (`check_weights`)
    modes = [opts.activation_checkpointing]
    if opts.activation_checkpointing == "auto":  # none, and full where the model allows it
        modes = ["none", "full"] if recompute.possible(model) else ["none"]
    probes: list[dict[str, Any]] = []

    def fits(micro: int, mode: str) -> bool:
        peak = probe_step(model, blocks, prec, opts, micro, mode)
        if peak is not None:
            peak += unprobed_bytes(model, opts, per_process // micro)
        probes.append({"micro_batch": micro, "activation_checkpointing": mode,
                       "peak_mb": None if peak is None else round(peak / 2**20, 1)})  # fmt: skip
        return peak is not None and peak <= budget

    chosen = None
    if opts.micro_batch != "auto":  # checkpointing alone is decided, at the asked micro-batch
        sizes = [opts.batch_size]
    for mode in modes:
        if fits(sizes[0], mode):
            chosen = (sizes[0], mode)
            break
    if chosen is None:  # the largest size that fits, with the last (the most frugal) mode
        mode = modes[-1]
        low, high, best = 1, len(sizes) - 1, None  # sizes[0] is known not to fit
        while low <= high:  # sizes fall as the index grows, and so does the peak
            mid = (low + high) // 2
            if fits(sizes[mid], mode):
                best, high = mid, mid - 1
            else:
                low = mid + 1
        chosen = None if best is None else (sizes[best], mode)
    chosen = _agree(chosen)
    if chosen is None:
        last = probes[-1]["peak_mb"]
        peaked = "ran out of memory" if last is None else f"peaks at {last:,.0f} MB"
        levers = ["--precision bf16-true", "--optimizer-state 8bit"]
        if "full" not in modes and recompute.possible(model):
            levers.append("--activation-checkpointing full")
        if opts.micro_batch != "auto":
            levers.append("--micro-batch auto")
        raise ConfigError(
            f"no micro-batch fits the {_size(budget)} memory budget ({whence}): a step of "
            f"{probes[-1]['micro_batch']} block(s) of {blocks.context} tokens {peaked}; raise "
            f"--memory-budget, shorten --context, or lower the memory with {', '.join(levers)}"
        )
    micro, mode = chosen
    record = {"micro_batch": micro, "grad_accum": per_process // micro,
              "activation_checkpointing": mode, "budget_mb": round(budget / 2**20),
              "budget_from": whence, "asked": f"{opts.batch_size} x {opts.grad_accum}",
              "probes": probes}  # fmt: skip
    log.info("micro-batch %d x %d accumulated (asked %s), activation checkpointing %s, within "
             "%s", micro, per_process // micro, record["asked"], mode, _size(budget))  # fmt: skip
    return _split(opts, micro, mode), record


def _split(opts: FitOptions, micro: int, mode: str) -> FitOptions:
    """`opts` stepping on micro-batches of `micro`, the global batch and evaluation kept.

    Evaluation takes as many blocks as with the asked batch size (or the fewest more that
    whole micro-batches hold), in smaller batches.
    """
    per_process = opts.batch_size * opts.grad_accum
    evaluated = opts.eval_batches * opts.batch_size
    return dataclasses.replace(opts, batch_size=micro, grad_accum=per_process // micro,
                               eval_batches=-(-evaluated // micro),
                               activation_checkpointing=mode, micro_batch=None)  # fmt: skip


def _agree(chosen: tuple[int, str] | None) -> tuple[int, str] | None:
    """Every process takes the smallest micro-batch any chose (and checkpointing if any did)."""
    if distributed.world()[1] == 1:
        return chosen
    micro = chosen[0] if chosen else 0
    full = 1.0 if chosen and chosen[1] != "none" else 0.0
    least, any_full = distributed.all_reduce([-float(micro), full], op="max")
    if least == 0:
        return None
    return int(-least), "full" if any_full else (chosen[1] if chosen else "none")
