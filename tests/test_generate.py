"""Generation semantics on a model of known logits: temperature 0 is the argmax, top-k draws
only from the k likeliest, the window slides past the context, and exactly N tokens come."""

from __future__ import annotations

import torch
from torch import nn

from amptrain.generate import sample
from amptrain.precision import resolve

FP32 = resolve("fp32", "cpu")


class FixedLogits(nn.Module):
    """The same logits at every position; remembers every window it was given."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)
        self.seen: list[torch.Tensor] = []
        self.unused = nn.Linear(1, 1)  # a parameter, as every model has

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.seen.append(ids.clone())
        return self.logits.expand(ids.shape[0], ids.shape[1], -1)


def test_temperature_zero_takes_the_likeliest_token():
    out = sample(FixedLogits([0.1, 2.0, 5.0, 4.9, -1.0]), torch.tensor([[0, 1]]), 3, FP32,
                 context=8, temperature=0)  # fmt: skip
    assert out.tolist() == [[0, 1, 2, 2, 2]]


def test_top_k_draws_only_from_the_k_likeliest():
    generator = torch.Generator().manual_seed(0)
    out = sample(FixedLogits([0.0, 3.0, 0.5, 2.9, 0.1, 0.2]), torch.tensor([[0]]), 400, FP32,
                 context=4, temperature=5.0, top_k=2, generator=generator)  # fmt: skip
    assert set(out[0, 1:].tolist()) == {1, 3}  # both drawn, nothing else at a high temperature


def test_a_prompt_longer_than_the_context_is_read_through_its_last_tokens():
    model = FixedLogits([0.0, 1.0])
    sample(model, torch.arange(10)[None], 3, FP32, context=4, temperature=0)
    assert [w.tolist() for w in model.seen] == [[[6, 7, 8, 9]], [[7, 8, 9, 1]], [[8, 9, 1, 1]]]


def test_exactly_max_new_tokens_are_appended_to_the_prompt():
    model, prompt = FixedLogits([0.0, 1.0, 0.5]), torch.tensor([[2, 0, 2]])
    out = sample(model, prompt, 7, FP32, context=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 10) and torch.equal(out[:, :3], prompt) and len(model.seen) == 7
