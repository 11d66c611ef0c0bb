"""One optimizer step and one evaluation: the numerical core of training.

`train_step()` reads top to bottom: forward under autocast, backward through the precision's
scaler, unscale, measure and clip the gradient norm, step (or skip a non-finite step), update
the loss scale, zero the gradients. The scheduler steps only after a real optimizer step.
Under DDP the same function runs on every rank; the few collectives it needs are no-ops in
a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from amptrain import data as data_mod
from amptrain import distributed
from amptrain.adapter import count_targets, forward_logits, next_token_hits, next_token_loss
from amptrain.config import FitOptions
from amptrain.head_loss import UNFUSED, LossPlan
from amptrain.precision import Precision
from amptrain.sharding import deferred_sync, is_sharded

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    lr: float
    stepped: bool
    tokens: int


def train_step(
    model: nn.Module,
    window: Sequence[Batch],
    precision: Precision,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    opts: FitOptions,
    attention: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loss_plan: LossPlan = UNFUSED,
) -> StepOutput:
    """One optimizer step over the micro-batches of `window` (gradient accumulation).

    Under DDP `model` is the wrapped module, under FSDP the sharded one: micro-batches before
    the last skip the gradient reduction (`sharding.deferred_sync`), and the loss is
    normalised by the token count of all ranks, so N ranks with batch B train exactly like
    one process with batch N*B.
    `attention` scopes the forward passes (the SDPA backend of `amptrain.attention`); the
    backward follows the kernels the forward chose. `loss_plan` computes the loss from the
    logits, or from the head's input without building them (`amptrain.head_loss`).
    """
    _, world_size = distributed.world()
    local_targets = sum(count_targets(y, opts.ignore_index) for _, y in window)
    (n_targets,) = distributed.all_reduce([float(local_targets)])
    lr = optimizer.param_groups[0]["lr"]
    total = torch.zeros((), device=window[0][0].device)
    for i, (x, y) in enumerate(window):
        with deferred_sync(model, i < len(window) - 1), precision.autocast():
            with attention():
                loss_sum = loss_plan.forward_loss(model, x, y, opts.ignore_index)
            # Normalise by the whole window's token count: every token weighs the same, so
            # accumulating A batches of B equals one batch of A*B. DDP and FSDP average over
            # ranks, hence the world size.
            precision.backward(loss_sum * (world_size / n_targets))
        total += loss_sum.detach()
    precision.unscale_(optimizer)  # clipping must see the true (unscaled) gradients
    norm = _grad_norm(model, opts.clip_norm)
    # One host sync per optimizer step: the non-finite policy must decide before stepping
    # (GradScaler.step makes the same sync to read its found-inf flag).
    grad_norm = norm.item()
    stepped = math.isfinite(grad_norm)
    if stepped:
        precision.step(optimizer)
        scheduler.step()  # never after a skipped step, so the schedule counts real updates
    precision.update()  # backs the loss scale off when unscale_ found inf/NaN
    optimizer.zero_grad(set_to_none=True)
    (loss,) = distributed.all_reduce([total.item()])
    return StepOutput(loss / n_targets, grad_norm, lr, stepped, int(n_targets))


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
