"""One optimizer step and one evaluation: the numerical core of training.

`train_step()` reads top to bottom: forward under autocast, backward through the precision's
scaler, unscale, measure and clip the gradient norm, step (or skip a non-finite step, on the
device), update the loss scale, zero the gradients. Its figures stay on the device.
Under DDP the same function runs on every rank; the few collectives it needs are no-ops in
a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from amptrain import data as data_mod
from amptrain import distributed
from amptrain.adapter import count_targets, forward_logits, next_token_hits, next_token_loss
from amptrain.compiling import LossFn, eager_loss
from amptrain.config import FitOptions
from amptrain.precision import Precision
from amptrain.sharding import deferred_sync, full_value, holds_shards, is_sharded

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one optimizer step reports, as tensors on the device: reading one is a host sync.

    The loop reads them only on logging steps (see `loop.DeviceCounters`), so a CUDA step
    queues its kernels without waiting for the previous one.
    """

    loss: torch.Tensor
    """Mean loss per target token over the window (all ranks), fp32."""
    grad_norm: torch.Tensor
    """Total gradient norm before clipping (unscaled)."""
    skipped: torch.Tensor
    """True when the gradient norm was inf or NaN: the optimizer step was skipped."""
    tokens: torch.Tensor
    """Target tokens of the window, all ranks."""
    lr: float


def train_step(
    model: nn.Module,
    window: Sequence[Batch],
    precision: Precision,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    opts: FitOptions,
    attention: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loss_fn: LossFn | None = None,
    gather_grads: Callable[[], None] | None = None,
) -> StepOutput:
    """One optimizer step over the micro-batches of `window` (gradient accumulation).

    Under DDP `model` is the wrapped module, under FSDP the sharded one: micro-batches before
    the last skip the gradient reduction (`sharding.deferred_sync`), and the loss is
    normalised by the token count of all ranks, so N ranks with batch B train exactly like
    one process with batch N*B.
    `attention` scopes the forward passes (the SDPA backend of `amptrain.attention`); the
    backward follows the kernels the forward chose. `loss_fn` is the forward and loss of one
    micro-batch: compiled (`amptrain.compiling`), fused with the head (`amptrain.head_loss`),
    or by default the eager one. `gather_grads` runs after the last backward, before the
    gradients are read: bf16 weights summed their micro-batches' gradients in fp32 aside
    (`low_weights.Lowered.gather`).

    Nothing here reads a tensor on the host (with a fused optimizer): the step of a non-finite
    gradient is skipped on the device, and the scheduler is stepped as if it were not; the loop
    takes a skipped step back from the schedule when it next reads the counters.
    """
    loss_fn = loss_fn or eager_loss(opts.ignore_index)
    _, world_size = distributed.world()
    n_targets = distributed.all_reduce_tensor(
        sum(target_count(y, opts.ignore_index) for _, y in window)
    )
    lr = optimizer.param_groups[0]["lr"]
    total = torch.zeros((), device=window[0][0].device)
    for i, (x, y) in enumerate(window):
        # The backward runs in the forward's attention scope too: a checkpointed block
        # recomputes its forward there, which must take the same kernels.
        with deferred_sync(model, i < len(window) - 1), precision.autocast(), attention():
            loss_sum = loss_fn(model, x, y)
            # Normalise by the whole window's token count: every token weighs the same, so
            # accumulating A batches of B equals one batch of A*B. DDP and FSDP average over
            # ranks, hence the world size.
            precision.backward(loss_sum * (world_size / n_targets))
        total += loss_sum.detach()
    if gather_grads is not None:
        gather_grads()
    precision.unscale_(optimizer)  # clipping must see the true (unscaled) gradients
    norm = full_value(_grad_norm(model, opts.clip_norm))  # FSDP: the norm over every shard
    skipped = ~torch.isfinite(norm)
    step_unless(optimizer, skipped)
    scheduler.step()  # the loop takes it back if the step was skipped (the schedule counts updates)
    precision.update()  # backs the loss scale off when unscale_ found inf/NaN
    optimizer.zero_grad(set_to_none=True)
    loss = distributed.all_reduce_tensor(total) / n_targets
    return StepOutput(loss, norm.detach(), skipped, n_targets, lr)


def target_count(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The positions `next_token_loss` scores, as a device tensor (no host read)."""
    return (labels[:, 1:] != ignore_index).sum()


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """Step the optimizer unless `skip` (a device bool), deciding on the device where it can.

    The gradients are already unscaled (fp16's `unscale_` ran), so the GradScaler has nothing
    left to do but skip, and a non-finite gradient in fp32 or bf16 must be skipped alike:
    kernels that take GradScaler's `found_inf` (fused AdamW) are given it and skip the update,
    step counter included, on the device. Other kernels cannot, nor can a sharded (DTensor)
    optimizer state, which takes no plain found-inf tensor: one host read decides.
    """
    on_device = getattr(optimizer, "_step_supports_amp_scaling", False)  # torch's own flag
    if on_device and not holds_shards(optimizer):
        optimizer.grad_scale, optimizer.found_inf = None, skip.float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
    elif not bool(skip):  # a host sync: the for-loop and foreach kernels cannot skip themselves
        optimizer.step()


def _grad_norm(model: nn.Module, clip_norm: float | None) -> torch.Tensor:
    """The total gradient norm before clipping; clips in place when `clip_norm` is set."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    blocks: data_mod.Blocks,
    precision: Precision,
    batch_size: int,
    max_batches: int | None = None,
    ignore_index: int = -100,
    attention: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Token-weighted loss, perplexity and accuracy on `blocks`, in fixed order, under autocast.

    Under torch.distributed the batches are shared out over the ranks and the sums reduced,
    so every rank returns the same figures.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, hits, count = 0.0, 0, 0
    rank, world_size = distributed.world()
    per_eval = batch_size * world_size  # the global batch, as in training
    n = len(blocks) if max_batches is None else min(len(blocks), max_batches * per_eval)
    # A sharded model gathers each block's parameters in its forward, a collective: every rank
    # runs the same number of forwards, one on a stand-in row where its share has run out.
    lockstep = is_sharded(model)
    for start in range(rank * batch_size, -(-n // per_eval) * per_eval, per_eval):
        if start >= n and not lockstep:
            break
        x, y = blocks.take(slice(start, start + batch_size) if start < n else slice(0, 1))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with precision.autocast(), attention():
            logits = forward_logits(model, x, y)
            if start >= n:
                continue  # the stand-in counts for nothing
            loss_sum += next_token_loss(logits, y, ignore_index).item()
        hits += int(next_token_hits(logits, y, ignore_index))
        count += count_targets(y, ignore_index)
    model.train(was_training)
    loss_sum, hits, count = distributed.all_reduce([loss_sum, float(hits), float(count)])
    mean = loss_sum / max(count, 1)
    return {
        "val/loss": mean,
        "val/perplexity": math.exp(mean) if mean < 700 else math.inf,
        "val/accuracy": hits / max(count, 1),
    }


class DeviceCounters:
    """The run's step figures, accumulated on the device and read together on logging steps.

    Reading a CUDA tensor waits for every queued kernel; reading these once per logging step
    (one `tolist()`) instead of once per step lets the device run ahead of the host.
    """

    def __init__(self, device: torch.device, skipped: int, consecutive: int) -> None:
        zeros = torch.zeros(7, dtype=torch.float64, device=device)
        # loss, grad norm, tokens since the last read, skipped (total), consecutive
        # non-finite, last finite loss, its step
        zeros[3], zeros[4], zeros[5], zeros[6] = skipped, consecutive, math.nan, -1
        self.values = zeros
        self.pending = 0  # steps since the last read

    def add(self, out: StepOutput, step: int) -> None:
        """Fold one step's output in, on the device."""
        v = self.values
        bad = out.skipped | ~torch.isfinite(out.loss)
        v[0], v[1] = out.loss, out.grad_norm
        v[2] += out.tokens
        v[3] += out.skipped
        v[4] = (v[4] + 1) * bad
        v[5] = torch.where(bad, v[5], out.loss.double())
        v[6] = torch.where(bad, v[6], step)
        self.pending += 1

    def read(self) -> dict[str, float]:
        """The figures, read on the host (one sync); the token count restarts."""
        loss, norm, tokens, skipped, consecutive, last, last_step = self.values.tolist()
        self.values[2] = 0
        self.pending = 0
        return {"loss": loss, "grad_norm": norm, "tokens": tokens, "skipped": skipped,
                "consecutive": consecutive, "last_finite_loss": last,
                "last_finite_step": last_step}  # fmt: skip


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on `device`; to a GPU from pinned memory, so the copy does not block the host."""
    if device.type != "cuda":
        return batch[0].to(device), batch[1].to(device)
    return _to_gpu(batch[0], device), _to_gpu(batch[1], device)


def _to_gpu(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()  # data already on the GPU is left where it is
    return tensor.to(device, non_blocking=True)


def device_clock(device: torch.device) -> float:
    """`time.perf_counter()` once `device`'s queued work is done (CUDA is synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # otherwise the clock measures only kernel queuing
    return time.perf_counter()
