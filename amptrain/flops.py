"""Model FLOPs of a training step per target token: the numerator of MFU.

Counted with `torch.utils.flop_counter` on one real batch (forward and backward), with two
corrections to what the counter does alone:

- **Attention is counted, and causal attention as causal.** torch's counter knows the CUDA
  kernels of `scaled_dot_product_attention` but counts them as full attention, and on the CPU
  it does not know the kernel at all (attention counts zero). Here every SDPA kernel is counted
  from its query, key and value shapes times the fraction of scores the mask lets through:
  `is_causal` (query i sees keys 0..i, so s(s+1)/2 of the s^2 scores) or an explicit boolean or
  additive mask (its allowed entries, counted). Forward: two matmuls (scores and their use on
  the values); backward: twice the forward, as torch counts it. Attention written by hand with
  `matmul` and `masked_fill` is counted as the matmuls it runs: full.
- **Per target token.** The loop's tokens/s counts the positions the loss scores
  (`adapter.count_targets`: all but the last of each row, minus ignored labels), so FLOPs are
  divided by the same count; a row of T ids costs the model T positions and scores T - 1.

Elementwise work (norms, activations, softmax, the loss) is not counted, as in every MFU
convention (PaLM, Megatron, nanoGPT).
"""

from __future__ import annotations

import torch
from torch import nn

from amptrain.adapter import IGNORE_INDEX, count_targets, forward_logits

# Each SDPA kernel by name, and whether it is a backward (which counts twice the forward).
_SDPA = {
    "_scaled_dot_product_flash_attention_for_cpu": False,
    "_scaled_dot_product_flash_attention": False,
    "_scaled_dot_product_efficient_attention": False,
    "_scaled_dot_product_cudnn_attention": False,
    "_scaled_dot_product_flash_attention_for_cpu_backward": True,
    "_scaled_dot_product_flash_attention_backward": True,
    "_scaled_dot_product_efficient_attention_backward": True,
    "_scaled_dot_product_cudnn_attention_backward": True,
}


def train_flops_per_token(
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[float, str]:
    """FLOPs of one forward + backward on `ids`, per target token, and how they were obtained.

    `labels` default to `ids` (next-token prediction on the same rows: every position but the
    last of each row is a target); positions labelled `ignore_index` are not targets. The
    model is counted in eval mode (dropout off: a CPU runs attention with dropout through
    plain matmuls, which the counter cannot tell causal), then put back as it was. If the
    counter sees nothing (an operator set it does not know), the 6N estimate (N = parameters)
    is returned instead.
    """
    from torch.utils.flop_counter import FlopCounterMode

    labels = ids if labels is None else labels
    counter = FlopCounterMode(display=False, custom_mapping=attention_formulas())
    was_training = model.training
    model.eval()
    try:
        with counter:
            forward_logits(model, ids, labels).float().sum().backward()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    total = counter.get_total_flops()
    targets = count_targets(labels, ignore_index) or ids.shape[0] * (ids.shape[1] - 1)
    if total > 0:
        how = "counted (torch.utils.flop_counter, forward + backward, causal attention as causal)"
        return total / max(targets, 1), how
    n_params = sum(p.numel() for p in model.parameters())
    return 6.0 * n_params, "estimated (6N, N = parameters)"


def attention_flops(
    query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...], allowed: float
) -> float:
    """Forward FLOPs of attention on `(batch, heads, seq, dim)` shapes, `allowed` of the scores.

    Key and value may have fewer heads than the query (grouped-query attention): the kernel
    broadcasts them, so the query's heads count.
    """
    b, heads, s_q, d_qk = query
    s_k, d_v = key[-2], value[-1]
    return 2.0 * b * heads * s_q * s_k * (d_qk + d_v) * allowed


def causal_fraction(s_q: int, s_k: int) -> float:
    """The fraction of an `s_q x s_k` score matrix a causal mask allows (top-left aligned).

    Query i sees keys 0..i, as `scaled_dot_product_attention(is_causal=True)` masks them:
    min(i + 1, s_k) keys, summed over the queries.
    """
    full = max(s_q - s_k, 0)  # queries past the last key see every key
    seen = min(s_q, s_k) * (min(s_q, s_k) + 1) // 2 + full * s_k
    return seen / (s_q * s_k)


def mask_fraction(mask: torch.Tensor) -> float:
    """The fraction of scores a boolean (True: attend) or additive mask allows.

    An additive mask masks a score with -inf, or with its dtype's lowest value (as Hugging
    Face writes it).
    """
    if mask.dtype == torch.bool:
        return float(mask.float().mean())
    return float((mask > torch.finfo(mask.dtype).min / 2).float().mean())


def attention_formulas() -> dict[object, object]:
    """A `FlopCounterMode(custom_mapping=...)` formula for each SDPA kernel this torch has.

    CPU flash, CUDA flash, memory-efficient and cuDNN, forward and backward; each counts the
    scores its causal flag or mask lets through.
    """
    ops = {getattr(torch.ops.aten, name, None): backward for name, backward in _SDPA.items()}
    return {op: _formula(op, backward) for op, backward in ops.items() if op is not None}


def _formula(op: object, backward: bool) -> object:
    names = [a.name for a in op.default._schema.arguments]

    def count(*args: object, out_val: object = None, **kwargs: object) -> int:
        bound = {**dict(zip(names, args)), **kwargs}
        query, key, value = bound["query"], bound["key"], bound["value"]
        mask = bound.get("attn_mask", bound.get("attn_bias"))
        if bound.get("is_causal"):
            allowed = causal_fraction(query.shape[-2], key.shape[-2])
        elif isinstance(mask, torch.Tensor):
            allowed = mask_fraction(mask)
        else:
            allowed = 1.0
        flops = attention_flops(tuple(query.shape), tuple(key.shape), tuple(value.shape), allowed)
        return round(flops * (2 if backward else 1))

    count._get_raw = True  # the counter passes the tensors, not their shapes: the mask is read
    return count
