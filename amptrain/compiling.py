"""The step's loss function, eager or compiled as one region with the model's forward.

`loss_function()` returns what the training step calls on each micro-batch: `fn(model, ids,
labels) -> summed next-token loss`. Eager, it is the model's forward and the chunked loss of
`amptrain.losses`. Compiled, the forward, the extraction of the logits and the loss are traced
together by `torch.compile` as one graph, so inductor fuses the log-softmax, the casts and the
gradient of the logits with the model's last kernels. Under compile the loss is the plain
`F.cross_entropy` on fp32 logits (which inductor fuses without materialising them twice)
unless the fp32 logits of one batch would exceed `CHUNK_ABOVE_BYTES`; then the compiled region
ends at the logits and the chunked loss runs after it, eagerly, keeping its memory promise.

The model itself is not modified, so parameter names and checkpoint keys stay as they are,
and evaluation (which calls the model, not this function) runs eagerly: no recompile for
`eval()` or `no_grad`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from amptrain.adapter import forward_logits, next_token_loss, takes_targets
from amptrain.precision import Precision

CHUNK_ABOVE_BYTES = 256 * 2**20
"""Under compile, the loss is chunked only when one batch's fp32 logits exceed this (256 MiB)."""

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def unchunked_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed next-token cross-entropy as `F.cross_entropy` on fp32 logits, for inductor to fuse.

    The shift is folded into the targets (position t against label t+1, the last position
    ignored), as `amptrain.losses` does, so the logits are not sliced.
    """
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), ignore_index)], 1)
    flat = logits.float().reshape(-1, logits.size(-1))
    return F.cross_entropy(flat, shifted.reshape(-1), ignore_index=ignore_index, reduction="sum")


def eager_loss(ignore_index: int) -> LossFn:
    """The uncompiled step's loss: the model's forward, then the chunked loss."""

    def loss_of(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return next_token_loss(forward_logits(model, ids, labels), labels, ignore_index)

    return loss_of


def fused_loss(model: nn.Module, ignore_index: int, chunked: bool) -> LossFn:
    """The function to compile: forward, logits and (unless `chunked`) the loss in one trace.

    Whether the forward takes nanoGPT-style `targets` is decided here, outside the trace, so
    dynamo sees no `inspect` call.
    """
    with_targets = takes_targets(type(getattr(model, "module", model)))

    def region(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = forward_logits(model, ids, labels, with_targets)
        return logits if chunked else unchunked_loss(logits, labels, ignore_index)

    return region


@dataclasses.dataclass(frozen=True)
class CompiledLoss:
    """A compiled loss function and the record of how it was built."""

    fn: LossFn
    record: dict[str, Any]


def compile_loss(
    model: nn.Module, sample: torch.Tensor, vocab: int, ignore_index: int
) -> CompiledLoss:
    """`torch.compile` the forward and loss as one region (compiled lazily, on the first call)."""
    logits_bytes = sample.numel() * vocab * 4
    chunked = logits_bytes > CHUNK_ABOVE_BYTES
    compiled = torch.compile(fused_loss(model, ignore_index, chunked))
    if chunked:

        def loss_of(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return next_token_loss(compiled(model, ids, labels), labels, ignore_index)

    else:
        loss_of = compiled
    how = "chunked, after the compiled forward" if chunked else "F.cross_entropy, fused"
    record = {"compiled_loss": f"{how} (fp32 logits {logits_bytes / 2**20:.0f} MiB)"}
    return CompiledLoss(loss_of, record)


def time_steps(
    loss_fn: LossFn,
    model: nn.Module,
    precision: Precision,
    sample: torch.Tensor,
    attention: Callable[[], contextlib.AbstractContextManager],
    steps: int,
) -> list[float]:
    """Seconds of each of `steps` forward+backward passes of `loss_fn` on `sample`.

    The passes run with the random generators forked and leave no gradients behind, so a
    measured run sees the same randomness and optimizer state as one that was not measured.
    """
    times = []
    with torch.random.fork_rng(devices=[sample.device] if sample.is_cuda else []):
        for _ in range(steps):
            start = time.perf_counter()
            with precision.autocast(), attention():
                loss = loss_fn(model, sample, sample)
            precision.backward(loss)
            if sample.is_cuda:
                torch.cuda.synchronize(sample.device)
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return times
