"""bf16 weights (`--precision bf16-true`): the trainable matrices stored, and updated, in bf16.

Under bf16 autocast amptrain keeps fp32 master weights, fp32 gradients and fp32 AdamW state:
16 bytes a parameter. With `weights="bf16"` the matrices of the linear layers are bf16 for the
whole run, so are their gradients and AdamW moments, and the update is compensated so that a
step smaller than half a bf16 spacing is not lost (torch-optimi's Kahan summation keeps the
rounding error in a bf16 buffer: 10 bytes a parameter in all). What the literature and optimi
keep in fp32 stays fp32: embeddings (and a head tied to them), norms and biases, and buffers
such as RoPE tables; the forward still runs under bf16 autocast, which casts their outputs.
`cast` returns what was kept, for the run's record.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def cast(model: nn.Module) -> dict[str, Any]:
    """Cast the trainable matrices of `model`'s linear layers to bf16; the record of it."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    cast_n, kept = 0, []
    for name, param in model.named_parameters():
        if not (param.requires_grad and param.is_floating_point()):
            continue
        if param.dim() >= 2 and id(param) not in embedded:
            param.data = param.data.to(torch.bfloat16)
            cast_n += param.numel()
        else:
            kept.append(name)
    return {"weights": "bf16", "bf16_parameters": cast_n, "kept_fp32": kept}


def any_bf16(params: list[torch.Tensor]) -> bool:
    """Whether any of the parameters is bf16 (the optimizer must then compensate)."""
    return any(p.dtype == torch.bfloat16 for p in params)
