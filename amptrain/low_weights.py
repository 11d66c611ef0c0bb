"""bf16 weights (`--precision bf16-true`): the trainable matrices stored, and updated, in bf16.

Under bf16 autocast amptrain keeps fp32 master weights, fp32 gradients and fp32 AdamW state:
16 bytes a parameter. With `weights="bf16"` the matrices of the linear layers are bf16 for the
whole run, so are their gradients and AdamW moments, and the update is compensated so that a
step smaller than half a bf16 spacing is not lost (torch-optimi's Kahan summation keeps the
rounding error in a bf16 buffer: 10 bytes a parameter in all). What the literature and optimi
keep in fp32 stays fp32: embeddings (and a head tied to them), norms and biases, and buffers
such as RoPE tables; the forward still runs under bf16 autocast, which casts their outputs.
`cast` returns the record of what was cast and kept, and `undo` returns the matrices to fp32
at the end of the run: exactly, since every bf16 value is an fp32 value, so the model after
`fit` is an fp32 model as after any run, and `model.safetensors` holds fp32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class Lowered:
    """The parameters a run cast to bf16, and the record of it; `undo` casts them back."""

    record: dict[str, Any]
    params: list[nn.Parameter] = dataclasses.field(default_factory=list)

    def undo(self) -> None:
        """Return the cast parameters to fp32 (exact)."""
        for param in self.params:
            param.data = param.data.float()
        self.params.clear()


def cast(model: nn.Module, weights: str) -> Lowered:
    """With `weights="bf16"`, cast the trainable weights of the linear layers to bf16.

    A linear layer's weight tied to an embedding (a tied head) stays fp32 with it.
    """
    if weights != "bf16":
        return Lowered({"weights": weights})
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear = {id(m.weight) for m in model.modules()
              if isinstance(m, nn.Linear) and id(m.weight) not in embedded}  # fmt: skip
    lowered = Lowered({"weights": "bf16"})
    kept = []
    for name, param in model.named_parameters():
        if not (param.requires_grad and param.is_floating_point()):
            continue
        if id(param) in linear:
            param.data = param.data.to(torch.bfloat16)
            lowered.params.append(param)
        else:
            kept.append(name)
    lowered.record.update(bf16_parameters=sum(p.numel() for p in lowered.params),
                          kept_fp32=kept)  # fmt: skip
    return lowered
