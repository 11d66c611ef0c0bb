"""AdamW with weight-decay groups, and the warm-up + cosine schedule counted in optimizer steps.

The AdamW update is element-wise work over every parameter, every step. torch's default on
CPU is the single-tensor for-loop; its fused kernel (CPU and CUDA) does the same arithmetic
in one pass, so amptrain asks for it wherever torch has it and says why when it does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from amptrain.blockwise8 import MIN_8BIT_SIZE
from amptrain.config import FitOptions
from amptrain.errors import ConfigError
from amptrain.shards import is_shard

_FLAGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def make_optimizer(model: nn.Module, opts: FitOptions) -> torch.optim.AdamW:
    """AdamW that decays matrices (dim >= 2) and leaves biases and norm weights alone.

    The kernel follows `opts.optimizer_impl`; `describe(optimizer)` says which one and why.

    Raises:
        ConfigError: If `fused` is requested explicitly and torch has no fused kernel for
            these parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": opts.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if opts.weights == "bf16":
        return _adamw_compensated(groups, opts)
    if opts.optimizer_state == "8bit":
        return _adamw_8bit(groups, opts, sharded=is_shard(params[0]))
    requested = opts.optimizer_impl
    missing = _fused_missing(params) if requested in ("auto", "fused") else None
    if requested == "fused" and missing:
        raise ConfigError(
            f"optimizer_impl='fused' is not available here ({missing}); use "
            "optimizer_impl='auto', which falls back to torch's default"
        )
    if requested == "auto":
        flags = {} if missing else _FLAGS["fused"]
        reason = f"auto: no fused AdamW for {missing}; torch's default" if missing else (
            "auto: torch has a fused AdamW for these parameters")  # fmt: skip
    else:
        flags, reason = _FLAGS[requested], "requested"
    optimizer = torch.optim.AdamW(groups, lr=opts.lr, betas=opts.betas, **flags)
    optimizer.amptrain_reason = reason
    return optimizer


def _adamw_compensated(groups: list[dict], opts: FitOptions) -> torch.optim.Optimizer:
    """AdamW for bf16 weights: stochastic rounding, Kahan summation (torch-optimi's) or none."""
    if opts.compensation == "sr":
        from amptrain.stochastic_round import StochasticAdamW

        eight = opts.optimizer_state == "8bit"
        if eight:
            from amptrain._imports import requires

            requires("bitsandbytes", "memory", "--optimizer-state 8bit", "leave it at 32bit")
        optimizer = StochasticAdamW(groups, lr=opts.lr, betas=opts.betas, seed=opts.seed,
                                    moments="8bit" if eight else "bf16")  # fmt: skip
        moments = ", moments in bitsandbytes' blockwise 8 bits" if eight else ""
        optimizer.amptrain_reason = ("bf16 weights: AdamW with stochastically rounded updates, "
                                     f"seeded by the run's seed and step{moments}")  # fmt: skip
        return optimizer
    from amptrain._imports import requires

    requires("optimi", "memory", "--precision bf16-true", "use --precision bf16")
    import optimi

    kahan = opts.compensation == "kahan"
    optimizer = optimi.AdamW(groups, lr=opts.lr, betas=opts.betas, eps=1e-8, kahan_sum=kahan,
                             foreach=False)  # fmt: skip
    optimizer.amptrain_reason = (
        "bf16 weights: torch-optimi's AdamW with Kahan-compensated updates" if kahan else
        "bf16 weights, updates rounded to nearest (compensation none, as asked)")  # fmt: skip
    return optimizer


def _adamw_8bit(groups: list[dict], opts: FitOptions, sharded: bool) -> torch.optim.Optimizer:
    """AdamW with blockwise 8-bit moments: bitsandbytes' (a CPU and a CUDA kernel).

    On FSDP2's shards, which bitsandbytes' optimizer cannot step, amptrain's
    (`stochastic_round.StochasticAdamW`) on bitsandbytes' format.
    """
    from amptrain._imports import requires

    requires("bitsandbytes", "memory", "--optimizer-state 8bit", "leave it at 32bit")
    if sharded:
        from amptrain.stochastic_round import StochasticAdamW

        optimizer = StochasticAdamW(groups, lr=opts.lr, betas=opts.betas, seed=opts.seed,
                                    moments="8bit")  # fmt: skip
        optimizer.amptrain_reason = ("8bit, sharded: bitsandbytes' blockwise 8-bit format, "
                                     "stepped on each process's shard (bitsandbytes' optimizer "
                                     "steps whole tensors)")  # fmt: skip
        return optimizer
    import bitsandbytes

    optimizer = bitsandbytes.optim.AdamW8bit(groups, lr=opts.lr, betas=opts.betas,
                                             min_8bit_size=MIN_8BIT_SIZE)  # fmt: skip
    optimizer.amptrain_reason = (f"8bit: bitsandbytes' blockwise 8-bit moments (tensors under "
                                 f"{MIN_8BIT_SIZE:,} elements keep 32-bit state)")  # fmt: skip
    return optimizer


STATE_FORMATS_CHANGED = {"torch-optimi AdamW, bf16 layers 2",
                         "amptrain StochasticAdamW 2, bf16 moments",
                         "amptrain StochasticAdamW 2, 8-bit moments"}  # fmt: skip
"""The formats whose layout changed since checkpoints recorded none (biases now bf16 with bf16
weights, 8-bit blocks along rows): a checkpoint without a format cannot hold them."""


def state_format(opts: FitOptions, sharded: bool) -> str:
    """The optimizer state's format under `opts` (`sharded`: the parameters are FSDP2 shards).

    A checkpoint records it and a resume must match it: the formats hold different state
    (bitsandbytes' `state1`/`absmax1`, amptrain's `exp_avg` codes and row-wise maxima).
    """
    ours = "amptrain StochasticAdamW 2, 8-bit moments"
    if opts.weights == "bf16":
        if opts.compensation == "sr":
            return ours if opts.optimizer_state == "8bit" else (
                "amptrain StochasticAdamW 2, bf16 moments")  # fmt: skip
        return "torch-optimi AdamW, bf16 layers 2"
    if opts.optimizer_state == "8bit":
        return ours if sharded else "bitsandbytes AdamW8bit"
    return "torch AdamW"


def _fused_missing(params: list[torch.Tensor]) -> str | None:
    """Why torch's fused AdamW cannot step these parameters, or None when it can.

    torch checks devices and dtypes only at the first step, so one tiny step per distinct
    (device, dtype) asks it before training starts.
    """
    for device, dtype in {(p.device, p.dtype) for p in params}:
        probe = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        try:
            torch.optim.AdamW([probe], fused=True).step()
        except RuntimeError as exc:
            return f"{dtype} parameters on {device.type} ({exc})"
    return None


def impl_of(optimizer: torch.optim.Optimizer) -> str:
    """The kernel the optimizer's next step will run, read from its param groups' flags."""
    if type(optimizer).__module__.startswith("bitsandbytes"):
        return "bitsandbytes 8-bit"
    if type(optimizer).__module__ == "amptrain.stochastic_round":
        params = [p for group in optimizer.param_groups for p in group["params"]]
        said = ["stochastic rounding"] if any(p.dtype == torch.bfloat16 for p in params) else []
        said += ["8-bit moments"] if optimizer.codec else []
        said += ["sharded"] if any(is_shard(p) for p in params) else []
        return ", ".join(said) or "AdamW"
    if type(optimizer).__module__.startswith("optimi"):
        return "optimi, Kahan" if optimizer.defaults.get("kahan_sum") else "optimi"
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    if group.get("foreach"):
        return "foreach"
    if group.get("foreach") is None:  # torch's default: foreach when all params are on CUDA
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return "foreach" if params and all(p.is_cuda for p in params) else "for-loop"
    return "for-loop"


def describe(optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """The optimizer, its kernel and why that kernel, for the run record."""
    return {
        "optimizer": type(optimizer).__name__,
        "optimizer_impl": impl_of(optimizer),
        "optimizer_reason": getattr(optimizer, "amptrain_reason", "built outside amptrain"),
    }


def load_state_keeping_impl(
    optimizer: torch.optim.Optimizer, state: dict, load: Callable[[dict], None] | None = None
) -> None:
    """`optimizer.load_state_dict(state)`, keeping this optimizer's fused/foreach choice.

    torch's `load_state_dict` replaces each param group with the saved one, `fused` and
    `foreach` flags included, so a checkpoint written by a for-loop AdamW would silently
    turn a fused optimizer back into the slow one. The fused kernel also wants its `step`
    counters as fp32 tensors on the parameters' device. `load` replaces
    `optimizer.load_state_dict` (a sharded optimizer loads through DCP's `set_state_dict`).
    """
    if type(optimizer) is not torch.optim.AdamW:  # another library's: its groups as saved
        (load or optimizer.load_state_dict)(state)
        return
    flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    (load or optimizer.load_state_dict)(state)
    for group, saved in zip(optimizer.param_groups, flags):
        group.update(saved)
        if not saved["fused"]:
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def lr_factor(step: int, opts: FitOptions) -> float:
    """The multiplier of the peak lr at optimizer step `step`: linear warm-up, then cosine decay."""
    warmup = opts.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(opts.max_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, opts: FitOptions
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; step it only after a real (not skipped) optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, opts))


def reset_lr(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    opts: FitOptions,
) -> None:
    """Set every group's lr to the schedule's value at `scheduler.last_epoch`."""
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_factor(scheduler.last_epoch, opts)
