"""Activation checkpointing: repeated blocks whose activations are recomputed in the backward.

`--activation-checkpointing` trades compute for memory on the repeated blocks amptrain finds
(`blocks.repeated_blocks`, the stack regional compilation and FSDP use):

- `none`: every activation kept (the default, and what `auto` is until a memory budget asks
  for more);
- `full`: each block keeps only its input; its inside is recomputed in the backward;
- `every:N`: blocks 0, N, 2N... are checkpointed, the others keep everything (torchtitan's
  selective layer checkpointing);
- `selective`: every block keeps the outputs of its matrix multiplies and attention and
  recomputes the cheap rest (norms, activations, casts): torch's selective checkpointing
  (`create_selective_checkpoint_contexts`), torchtitan's op-level policy.

Checkpointing is torch's non-reentrant `torch.utils.checkpoint.checkpoint`, which restores the
autocast state and the generators on recompute, so in fp32 the run is bit for bit the run
without it. It wraps each chosen block's `forward` for the run only (`Recompute.undo` puts it
back), so parameter and module names do not change, and it is applied before sharding and
compiling: checkpoint, then shard (`fully_shard` per block, torchtitan's order), then compile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from amptrain import lora
from amptrain.blocks import repeated_blocks
from amptrain.errors import ConfigError

MODES = "none, full, every:N (N >= 1), selective or auto"


def parse(mode: str) -> tuple[str, int]:
    """`(kind, every)` of a mode: `("every", 2)` for `every:2`, `("full", 1)` for `full`.

    Raises:
        ConfigError: For anything but the modes `MODES` lists.
    """
    if mode in ("none", "auto", "selective"):
        return mode, 1
    if mode == "full":
        return "every", 1
    kind, _, n = str(mode).partition(":")
    if kind == "every" and n.isdigit() and int(n) >= 1:
        return "every", int(n)
    raise ConfigError(f"activation_checkpointing={mode!r} is invalid: it must be {MODES}")


def possible(model: nn.Module) -> bool:
    """Whether the model has a stack of repeated blocks to checkpoint."""
    return _blocks(model) is not None


def check(model: nn.Module, mode: str) -> None:
    """Refuse a mode that checkpoints something on a model with no repeated blocks.

    Raises:
        ConfigError: Naming the mode and why it cannot apply.
    """
    if parse(mode)[0] in ("none", "auto"):
        return
    if _blocks(model) is None:
        raise ConfigError(f"--activation-checkpointing {mode}: this model has no stack of "
                          "repeated blocks (an nn.ModuleList or nn.Sequential of one block "
                          "class) to checkpoint; use none")  # fmt: skip


@dataclasses.dataclass
class Recompute:
    """The blocks checkpointed for one run; `undo` restores their own `forward`."""

    record: dict[str, Any]
    wrapped: list[tuple[nn.Module, Any]] = dataclasses.field(default_factory=list)

    def undo(self) -> None:
        """Put every wrapped block's `forward` back."""
        for block, own in self.wrapped:
            if own is None:
                del block.forward
            else:
                block.forward = own
        self.wrapped.clear()


def apply(model: nn.Module, mode: str) -> Recompute:
    """Checkpoint the blocks `mode` chooses; returns what to undo and the run's record."""
    kind, every = parse(mode)
    if kind in ("none", "auto"):
        return Recompute({"activation_checkpointing": "none"})
    found = _blocks(model)
    context = _selective if kind == "selective" else None
    applied = Recompute({"activation_checkpointing": mode})
    for i, block in enumerate(found.blocks):
        if i % every:
            continue
        own = block.__dict__.get("forward")
        block.forward = functools.partial(_checkpointed, block.forward, context)
        applied.wrapped.append((block, own))
    applied.record["checkpointed_blocks"] = f"{len(applied.wrapped)} of {len(found.blocks)}"
    return applied


def _blocks(model: nn.Module):
    return repeated_blocks(model.get_base_model() if lora.is_lora(model) else model)


def _checkpointed(forward: Callable[..., Any], context: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation: nothing to keep for a backward
        return forward(*args, **kwargs)
    if context is None:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False,
                                             context_fn=context, **kwargs)  # fmt: skip


def _saved_ops() -> list[Any]:
    """The ops whose outputs `selective` keeps: matrix multiplies and attention."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")  # fmt: skip
    return [getattr(aten, n).default for n in names if hasattr(aten, n)]


def _selective() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_saved_ops())
