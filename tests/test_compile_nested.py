"""Why the one-graph compiled step does not mark its blocks as nested compile regions.

`torch.compiler.nested_compile_region` would let the one-graph step compile a repeated block
once (the compile time of regional compilation, the fusions of one graph). In torch 2.13 a
region reused in the backward computes wrong gradients under inductor (aot_eager is right, and
so is a single, unreused region). For the small stack here the gradient flowing out of the
first region is lost: the region's backward is lowered with the top-level backward's
donated-buffer indices and overwrites an input its caller still needs (pytorch/pytorch#192840,
#193960); `torch._functorch.config.donated_buffer = False` makes it right. The built-in model
goes wrong even then, in every gradient before the last block (the earlier measurement: a wte
gradient norm of 46,434 against 41.8); only `torch._inductor.config.allow_buffer_reuse = False`
makes it right, so a second buffer-reuse path is involved that no report found names. These
tests fail strictly once torch computes the gradients right, so the option can be reconsidered.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn

from amptrain.models.tiny_gpt import Block as TinyBlock


class Block(nn.Module):
    """A residual GELU MLP, marked as a region compiled once and reused for every layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    @torch.compiler.nested_compile_region
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


class Stack(nn.Module):
    """Embedding, two marked blocks, a head: the shape of a language model, as small as it goes."""

    def __init__(self, vocab: int = 32, width: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def step(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def compiled_and_eager_grads(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter's gradient from the compiled step and from the eager one."""
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (torch.compile(step, backend="inductor", fullgraph=True), step):
        model.zero_grad(set_to_none=True)
        fn(model, ids).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return list(zip(*grads))


XFAIL = pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="torch 2.13: a reused nested region's backward under inductor corrupts the "
    "gradients before it (pytorch/pytorch#192840 and a buffer-reuse path)",
)  # fmt: skip


@pytest.mark.slow
@XFAIL
def test_a_reused_nested_region_in_one_compiled_graph_gives_eager_gradients():
    torch.manual_seed(0)
    for got, want in compiled_and_eager_grads(Stack()):  # the embedding's: all zeros
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@XFAIL
def test_the_built_in_model_s_blocks_as_nested_regions_give_eager_gradients(monkeypatch):
    marked = torch.compiler.nested_compile_region(TinyBlock.forward)
    monkeypatch.setattr(TinyBlock, "forward", marked)
    for got, want in compiled_and_eager_grads(tiny_model()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
