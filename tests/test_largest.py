"""What fits a memory budget: the largest batch and the deepest model of the model's shape."""

from __future__ import annotations

import pytest
import torch
from conftest import pattern_blocks, tiny_model
from torch import nn

from amptrain import largest, step_probe
from amptrain.config import FitOptions
from amptrain.precision import resolve

CPU = torch.device("cpu")


def test_the_deepest_model_is_searched_by_doubling_then_bisecting(monkeypatch):
    """A step of known size: 10 MiB a block, so a 95 MiB budget holds 9 blocks."""
    asked = []

    def probe(model, blocks, prec, opts, batch, mode, depth=None):
        asked.append(depth)
        return depth * 10 * 2**20

    monkeypatch.setattr(largest, "probe_step", probe)
    depth = largest.largest_depth(tiny_model(n_layer=2), pattern_blocks(8), resolve("fp32", CPU),
                                  FitOptions(), 95 * 2**20, batch=2)  # fmt: skip
    assert depth == 9
    assert asked == [2, 4, 8, 16, 12, 10, 9]  # from a stack of 2, doubled, then bisected
    assert largest.largest_depth(nn.Linear(2, 2), pattern_blocks(8), resolve("fp32", CPU),
                                 FitOptions(), 2**30, batch=2) is None  # no blocks  # fmt: skip


def test_a_deepened_model_runs_its_copies_and_is_given_back():
    model = tiny_model(n_layer=2, n_embd=32)
    blocks = model.blocks
    undo = step_probe.deepen(model, 5)
    assert len(model.blocks) == 5 and model.blocks[0] is not blocks[0]
    model(torch.zeros(2, 8, dtype=torch.long)).sum().backward()
    undo()
    assert model.blocks is blocks and not model.blocks[0]._forward_hooks
    prec, opts = resolve("fp32", CPU), FitOptions()
    two, six = (step_probe.probe_step(model, pattern_blocks(8), prec, opts, 4, "none", depth=d)
                for d in (2, 6))  # fmt: skip
    assert two is not None and six is not None and six > two  # four more blocks held


class _Counted(nn.Module):
    """A model that runs as many of its blocks as its config says (as some do)."""

    def __init__(self) -> None:
        super().__init__()
        self.n_layer = 2
        self.embed = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks[: self.n_layer]:
            h = block(h)
        return self.head(h)


def test_a_model_that_leaves_added_blocks_out_has_no_depth_answer():
    prec, opts = resolve("fp32", CPU), FitOptions()
    assert step_probe.probe_step(_Counted(), pattern_blocks(8), prec, opts, 2, "none") is not None
    with pytest.raises(step_probe.Unrun, match="2 of the added blocks did not run"):
        step_probe.probe_step(_Counted(), pattern_blocks(8), prec, opts, 2, "none", depth=4)
    assert largest.largest_depth(_Counted(), pattern_blocks(8), prec, opts, 2**30, 2) is None


def test_blocks_in_a_sequential_deepen_as_a_sequential():
    model = _Counted()
    model.blocks = nn.Sequential(*model.blocks)
    model.n_layer = 99
    undo = step_probe.deepen(model, 3)
    assert isinstance(model.blocks, nn.Sequential) and len(model.blocks) == 3
    model(torch.zeros(1, 4, dtype=torch.long))
    undo()
    assert len(model.blocks) == 2
