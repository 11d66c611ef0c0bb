"""amptrain's AdamW for bf16 weights and 8-bit moments: chunked updates and its 8-bit blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amptrain import stochastic_round
from amptrain.stochastic_round import StochasticAdamW

pytest.importorskip("bitsandbytes")


def _stepped(dtype: torch.dtype, moments: str, steps: int = 3) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(96, 128).to(dtype))
    optimizer = StochasticAdamW([weight], lr=1e-2, seed=7, moments=moments)
    for _ in range(steps):
        weight.grad = torch.randn(96, 128).to(dtype)
        optimizer.step()
    return weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()
                                     if isinstance(v, torch.Tensor)}  # fmt: skip


@pytest.mark.parametrize("dtype, moments", [(torch.bfloat16, "bf16"), (torch.bfloat16, "8bit"),
                                            (torch.float32, "8bit")])  # fmt: skip
def test_an_update_in_chunks_of_rows_equals_the_whole(monkeypatch, dtype, moments):
    """The step works on a few rows at a time, so its fp32 temporaries stay small; the
    random bits are drawn in turn from one generator, so the result is the same bits."""
    whole, whole_state = _stepped(dtype, moments)
    sizes = []
    update = StochasticAdamW._update_rows
    monkeypatch.setitem(stochastic_round.CHUNK, "cpu", 1000)  # 7 rows of 128 at a time

    def spied(self, param, *args):
        sizes.append(param.numel())
        return update(self, param, *args)

    monkeypatch.setattr(StochasticAdamW, "_update_rows", spied)
    chunked, chunked_state = _stepped(dtype, moments)
    assert max(sizes) == 7 * 128 and len(sizes) == 3 * 14  # 96 rows: 13 chunks of 7, one of 5
    assert torch.equal(chunked, whole)
    for name, value in whole_state.items():
        assert torch.equal(chunked_state[name], value), name


def test_8bit_blocks_never_cross_a_row():
    optimizer = StochasticAdamW([nn.Parameter(torch.zeros(1))], moments="8bit")
    block = {shape: optimizer._block(torch.zeros(shape, dtype=torch.bfloat16))
             for shape in [(64, 768), (64, 384), (128, 64), (128, 32), (8192,)]}  # fmt: skip
    assert block == {(64, 768): 256, (64, 384): 128, (128, 64): 64, (128, 32): None,
                     (8192,): None}  # fmt: skip
    assert optimizer._block(torch.zeros(4, 512)) is None  # under 4,096 elements: 16-bit
    weight = nn.Parameter(torch.zeros(64, 384, dtype=torch.bfloat16))
    optimizer = StochasticAdamW([weight], moments="8bit")
    state = optimizer.state[weight]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_absmax"].shape == (64, 3)
