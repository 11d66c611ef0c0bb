"""A fused, chunked next-token cross-entropy that never builds an fp32 copy of the logits.

`F.cross_entropy(logits.float(), ...)` on `[B, T, V]` logits materialises the fp32 logits,
their fp32 log-softmax (kept for the backward) and, in the backward, an fp32 gradient that
is then cast down: several full `[B*T, V]` fp32 tensors for the largest activation of a
language model. Here the rows are processed in chunks: the forward keeps only the fp32
log-sum-exp per row; the backward recomputes each chunk's softmax and writes the gradient
straight into a tensor of the logits' own dtype. Peak extra memory is one fp32 chunk.

The next-token shift is folded into the targets (position t is scored against label t+1,
the last position against `ignore_index`), so the logits are used as they come, without the
copy that slicing `logits[:, :-1]` and reshaping it would make.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22
"""fp32 elements per chunk on a CPU (16 MiB): large enough that the per-chunk overhead vanishes,
small enough to stay far below a [B*T, V] tensor at any realistic vocabulary."""

GPU_CHUNK_FACTOR = 16
"""A GPU's chunks are this many times larger (256 MiB of fp32): each chunk launches several
kernels, and 83 rows at V = 50,257 would leave a GPU waiting on launches, not on memory."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 stays fp64 (gradient checks); everything narrower is computed in fp32.
    return torch.promote_types(dtype, torch.float32)


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of `[N, vocab]` logits in one chunk of the loss on `device`."""
    elements = CHUNK_ELEMENTS * (GPU_CHUNK_FACTOR if device.type == "cuda" else 1)
    return max(1, elements // max(vocab, 1))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `[N, V]` logits against `[N]` targets, chunked over rows.

    Rows whose target is `ignore_index` add nothing to the loss and get a zero gradient.
    Autocast is switched off inside: the arithmetic dtype is chosen here, not by the context.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
    ) -> torch.Tensor:
        """Sum over rows of `logsumexp(row) - row[target]`, in fp32 (fp64 for fp64 input)."""
        rows, vocab = logits.shape
        dtype = _compute_dtype(logits.dtype)
        lse = torch.empty(rows, dtype=dtype, device=logits.device)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        valid = targets != ignore_index
        safe = targets.masked_fill(~valid, 0)  # any in-range id; its row is masked out below
        with torch.autocast(logits.device.type, enabled=False):
            step = chunk_rows(vocab, logits.device)
            for start in range(0, rows, step):
                end = min(start + step, rows)
                block = logits[start:end].to(dtype)
                lse[start:end] = torch.logsumexp(block, dim=-1)
                picked = block.gather(1, safe[start:end, None]).squeeze(1)
                total += ((lse[start:end] - picked) * valid[start:end]).sum()
        ctx.save_for_backward(logits, safe, valid, lse)
        return total

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        """d/dlogits = (softmax(row) - onehot(target)) * grad_out, zero for ignored rows."""
        logits, safe, valid, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        grad = torch.empty_like(logits)
        scale = valid.to(lse.dtype) * grad_out.to(lse.dtype)
        with torch.autocast(logits.device.type, enabled=False):
            step = chunk_rows(vocab, logits.device)
            for start in range(0, rows, step):
                end = min(start + step, rows)
                probs = (logits[start:end].to(lse.dtype) - lse[start:end, None]).exp_()
                probs.scatter_add_(1, safe[start:end, None], probs.new_full((end - start, 1), -1))
                grad[start:end] = probs.mul_(scale[start:end, None])
        return grad, None, None


def next_token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Summed next-token cross-entropy of `[B, T, V]` logits: position t predicts label t+1.

    Equal to `F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
    ignore_index=ignore_index, reduction="sum")` within fp32 rounding (the tests bound it),
    without that expression's fp32 copies of the logits. The result is an fp32 scalar (fp64
    for fp64 logits).
    """
    vocab = logits.size(-1)
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return ChunkedCrossEntropy.apply(logits.reshape(-1, vocab), shifted.reshape(-1), ignore_index)
