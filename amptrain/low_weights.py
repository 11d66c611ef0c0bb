"""bf16 weights (`--precision bf16-true`): the layers' parameters stored, and updated, in bf16.

Under bf16 autocast amptrain keeps fp32 master weights, fp32 gradients and fp32 AdamW state:
16 bytes a parameter. With `weights="bf16"` the layers' parameters (linear layers' matrices
and biases) are bf16 for the whole run, so are their gradients and AdamW moments, and the
update is compensated so that a step smaller than half a bf16 spacing is not lost
(torch-optimi's Kahan summation keeps the rounding error in a bf16 buffer: 10 bytes a
parameter in all). What the literature and optimi keep in fp32 stays fp32: embeddings (and a
head tied to them), norms, and buffers such as RoPE tables; the forward still runs under bf16
autocast, which casts their outputs. Biases are cast with their matrices: autocast casts them
for the matmul anyway, the update is compensated, and FSDP2 needs one dtype in each of its
units (`sharding`). `cast` returns the record of what was cast and kept, and `undo` returns
them to fp32 at the end of the run: exactly, since every bf16 value is an fp32 value, so the
model after `fit` is an fp32 model as after any run, and `model.safetensors` holds fp32.

Gradient accumulation sums in fp32: after each micro-batch's backward a hook adds the bf16
gradient into an fp32 sum and clears it, and `gather` hands the optimizer the sum rounded
once, so a window of A micro-batches rounds its gradient as one batch of A does. Under DDP
the gradients are all-reduced in fp32 (`fp32_allreduce`), as bf16 autocast's are. FSDP2
reduce-scatters them in fp32 (its policy's reduce dtype) and, over a window, keeps the
unsharded sums in fp32 itself, so the hooks are not needed there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from amptrain.blocks import kept_in_fp32
from amptrain.shards import is_shard


@dataclasses.dataclass
class Lowered:
    """The parameters a run cast to bf16, and the record of it; `undo` casts them back."""

    record: dict[str, Any]
    params: list[nn.Parameter] = dataclasses.field(default_factory=list)
    sums: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    hooks: list[Any] = dataclasses.field(default_factory=list)

    def accumulate_in_fp32(self) -> None:
        """Sum the cast parameters' gradients in fp32 over a window (see `gather`)."""
        for param in self.params:
            self.hooks.append(param.register_post_accumulate_grad_hook(self._add))
        self.record["gradient_accumulation"] = "fp32 sums"

    def _add(self, param: torch.Tensor) -> None:
        held = self.sums.get(id(param))
        if held is None:
            self.sums[id(param)] = param.grad.float()
        else:
            held.add_(param.grad)
        param.grad = None

    def gather(self) -> None:
        """Give each cast parameter its window's fp32 gradient sum, rounded once to bf16."""
        for param in self.params:
            held = self.sums.pop(id(param), None)
            if held is not None:
                param.grad = held.to(param.dtype)
        self.sums.clear()

    def follow_shards(self, model: nn.Module) -> None:
        """Hold the model's sharded bf16 parameters instead of the whole ones `cast` made.

        `fully_shard` replaces every parameter with a DTensor of this process's rows; the
        whole bf16 tensors would otherwise stay alive here, a full copy of the weights on
        every process.
        """
        self.params = [p for p in model.parameters() if p.dtype == torch.bfloat16]

    def undo(self) -> None:
        """Return the cast parameters to fp32 (exact).

        FSDP2's shards stay bf16 (its units hold one dtype); `sharding.full_state_dict`
        widens them as it gathers them.
        """
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.sums.clear()
        for param in self.params:
            if not is_shard(param):
                param.data = param.data.float()
        self.params.clear()


def fp32_allreduce(group, bucket):  # noqa: ANN001, ANN201 (DDP reads the annotations)
    """A DDP comm hook: average a bucket of gradients in fp32, whatever their dtype.

    DDP checks a hook's annotations against its own classes, and under postponed annotations
    they are strings, so this one has none.
    """
    import torch.distributed as dist

    buffer = bucket.buffer()
    wide = buffer.float().div_(dist.get_world_size(group))
    future = dist.all_reduce(wide, group=group, async_op=True).get_future()

    def back(done: Any) -> torch.Tensor:
        return buffer.copy_(done.value()[0])

    return future.then(back)


def castable(model: nn.Module) -> set[int]:
    """The ids of the parameters `cast` lowers to bf16.

    Every parameter of a layer below the model that is not a norm or an embedding
    (`blocks.kept_in_fp32`): a linear layer's matrix and bias, Hugging Face's `Conv1D`, an
    attention's own projection. A parameter that a kept layer shares (a head tied to the
    embedding) stays fp32 with it, and so do the parameters the model holds itself (a learned
    position table).
    """
    kept, low = set(), set()
    for module in model.modules():
        held = {id(p) for p in module.parameters(recurse=False)}
        if module is model or kept_in_fp32(module):
            kept |= held
        else:
            low |= held
    return low - kept


def cast(model: nn.Module, weights: str) -> Lowered:
    """With `weights="bf16"`, cast the trainable parameters `castable` names to bf16."""
    if weights != "bf16":
        return Lowered({"weights": weights})
    linear = castable(model)
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
    saved = "fp32: the bf16 matrices widened exactly at the end"
    lowered.record.update(bf16_parameters=sum(p.numel() for p in lowered.params),
                          kept_fp32=kept, saved_weights=saved)  # fmt: skip
    return lowered
