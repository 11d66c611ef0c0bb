"""The repeated blocks of a model, found from its module tree.

A transformer is a stack of identical blocks: `TinyGPT.blocks`, nanoGPT's `transformer.h`,
Llama's `model.layers`. Both regional compilation (compile one block, reuse the code for every
layer) and sharding (one `fully_shard` unit per block) work on that stack, so they find it the
same way: the children of the largest `nn.ModuleList` or `nn.Sequential` whose children are
all of one class. A model without such a container has no repeated blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class RepeatedBlocks:
    """The stack of identical blocks of a model.

    Attributes:
        path: the container's qualified name in the model (`"blocks"`, `"transformer.h"`).
        container: the `nn.ModuleList` or `nn.Sequential` itself.
        blocks: its children, in order.
    """

    path: str
    container: nn.Module
    blocks: tuple[nn.Module, ...]

    @property
    def block_class(self) -> str:
        """The name of the blocks' class, for records and messages."""
        return type(self.blocks[0]).__name__


def repeated_blocks(model: nn.Module) -> RepeatedBlocks | None:
    """The largest stack of at least two same-class blocks in `model`, or None.

    "Largest" counts the parameters of the whole stack, so a model's main stack wins over a
    small repeated helper (a list of two norms, say). Ties go to the first in module order.

    Example:
        >>> found = repeated_blocks(TinyGPT(GPTConfig(n_layer=4)))
        >>> found.path, len(found.blocks)
        ('blocks', 4)
    """
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = tuple(module.children())
        if len(children) < 2 or len({type(child) for child in children}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = RepeatedBlocks(name, module, children), size
    return best


def kept_in_fp32(module: nn.Module) -> bool:
    """True for the layers that mixed precision keeps in fp32: normalisations and embeddings.

    Autocast runs norms in fp32 and never casts an embedding's lookup; bf16 weights
    (`low_weights`) and FSDP's mixed-precision units (`sharding`) keep the same layers fp32.
    Found by class name, so that `LlamaRMSNorm`, `T5LayerNorm` and a hand-written `RMSNorm`
    count as `nn.LayerNorm` does.
    """
    name = type(module).__name__
    return isinstance(module, nn.Embedding) or "Norm" in name or "Embedding" in name
