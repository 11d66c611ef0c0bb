"""The step's loss function, eager or compiled as one region with the model's forward.

`loss_function()` returns what the training step calls on each micro-batch: `fn(model, ids,
labels) -> summed next-token loss`. Eager, it is the model's forward and the chunked loss of
`amptrain.losses`. Compiled, the forward, the extraction of the logits and the loss are traced
together by `torch.compile` as one graph, so inductor fuses the log-softmax, the casts and the
gradient of the logits with the model's last kernels. Under compile the loss is the plain
`F.cross_entropy` on fp32 logits (which inductor fuses without materialising them twice)
unless the fp32 logits of one batch would exceed `CHUNK_ABOVE_BYTES`; then the compiled region
ends at the logits and the chunked loss runs after it, eagerly, keeping its memory promise.

Regional compilation (`compile_loss(regional=True)`): where the model has a stack of repeated
blocks (`amptrain.blocks`), each block is compiled in place and dynamo reuses the one compiled
block for every layer, so the compile time hardly grows with depth; the loss is then compiled
as its own graph. `benchmarks/compile_time.py` measures both ways.

The model is not wrapped, so parameter names and checkpoint keys stay as they are, and
evaluation (which calls the model, not this function) runs eagerly: no recompile for `eval()`
or `no_grad`.
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

from amptrain.adapter import forward_logits, inner_model, next_token_loss, takes_targets
from amptrain.blocks import repeated_blocks
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


def eager_forward(model: nn.Module) -> LossFn:
    """`forward_logits` with the `targets` question answered in advance (no `inspect` per call)."""
    with_targets = takes_targets(type(inner_model(model)))

    def forward(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return forward_logits(model, ids, labels, with_targets)

    return forward


def fused_loss(model: nn.Module, ignore_index: int, chunked: bool) -> LossFn:
    """The function to compile: forward, logits and (unless `chunked`) the loss in one trace.

    Whether the forward takes nanoGPT-style `targets` is decided here, outside the trace, so
    dynamo sees no `inspect` call.
    """
    forward = eager_forward(model)

    def region(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = forward(model, ids, labels)
        return logits if chunked else unchunked_loss(logits, labels, ignore_index)

    return region


@dataclasses.dataclass(frozen=True)
class CompiledLoss:
    """A compiled loss function, the record of how it was built, and how to undo its marks."""

    fn: LossFn
    record: dict[str, Any]
    undo: Callable[[], None]


def compile_blocks(model: nn.Module) -> tuple[str, Callable[[], None]]:
    """Compile each repeated block in place (`nn.Module.compile`); returns a record and an undo.

    dynamo keys its cache on the code, and every block runs its class's forward with its own
    parameters as inputs, so the block is traced and compiled once and reused for each layer.
    """
    found = repeated_blocks(model)
    if found is None:
        return "none (no repeated blocks found)", lambda: None
    for block in found.blocks:
        block.compile()

    def undo() -> None:
        for block in found.blocks:
            block._compiled_call_impl = None  # torch's slot for it; no public way to uncompile

    return f"{len(found.blocks)} x {found.block_class} ({found.path}), compiled once", undo


def compile_loss(
    model: nn.Module, sample: torch.Tensor, vocab: int, ignore_index: int, regional: bool = False
) -> CompiledLoss:
    """`torch.compile` the forward and loss as one region (compiled lazily, on the first call).

    `regional` compiles instead each repeated block (once for all layers) and the loss as its
    own graph, with the rest of the forward eager: a shorter compile for deep models, fewer
    fusions. The one-region step marking the blocks as a `torch.compiler.nested_compile_region`
    would combine both, but in torch 2.13 its gradients are wrong (a reused region's backward
    under inductor overwrites buffers its caller still needs: pytorch/pytorch#192840, and a
    buffer-reuse path only `allow_buffer_reuse=False` avoids; `tests/test_compile_nested.py`),
    so it is not used.
    """
    logits_bytes = sample.numel() * vocab * 4
    chunked = logits_bytes > CHUNK_ABOVE_BYTES
    how = "chunked, after the compiled forward" if chunked else "F.cross_entropy, fused"
    record = {"compiled_loss": f"{how} (fp32 logits {logits_bytes / 2**20:.0f} MiB)"}
    if regional:
        record["compiled_blocks"], undo = compile_blocks(model)
        loss = next_token_loss if chunked else torch.compile(unchunked_loss)
        forward = eager_forward(model)

        def loss_of(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return loss(forward(model, ids, labels), labels, ignore_index)

        return CompiledLoss(loss_of, record, undo)
    record["compiled_blocks"] = "all, in the one graph"
    compiled = torch.compile(fused_loss(model, ignore_index, chunked))
    if chunked:

        def loss_of(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return next_token_loss(compiled(model, ids, labels), labels, ignore_index)

        return CompiledLoss(loss_of, record, lambda: None)
    return CompiledLoss(compiled, record, lambda: None)


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
                # distinct labels, as in training: a compiled graph guards on input aliasing
                loss = loss_fn(model, sample, sample.clone())
            precision.backward(loss)
            if sample.is_cuda:
                torch.cuda.synchronize(sample.device)
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)  # a training step's forward holds none either
    return times


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a rise during training: recompiles)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
