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


def test_top_p_draws_only_from_the_smallest_set_reaching_p():
    from amptrain.generate import nucleus

    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    kept = lambda p: nucleus(probs, p).ne(0).tolist()  # noqa: E731
    assert kept(0.7) == [[False, True, True, False]]  # 0.5 < 0.7, 0.8 reaches it
    assert kept(0.5) == [[False, True, False, False]]  # the likeliest always kept
    assert kept(0.85) == [[False, True, True, True]]
    assert torch.equal(nucleus(probs, 1.0), probs)
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 2.8, 0.1, 0.2]).log_softmax(-1).tolist()
    out = sample(FixedLogits(logits), torch.tensor([[0]]), 300, FP32, context=4,
                 temperature=1.0, top_p=0.8, generator=generator)  # fmt: skip
    assert set(out[0, 1:].tolist()) == {1, 2}


class Scripted(nn.Module):
    """Emits the tokens of a script, one a step, whatever it is given."""

    def __init__(self, script: list[int], vocab: int = 256) -> None:
        super().__init__()
        self.script, self.vocab, self.unused = script, vocab, nn.Linear(1, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        step = len(self.seen) if hasattr(self, "seen") else 0
        self.seen = [*getattr(self, "seen", []), 1]
        logits = torch.full((ids.shape[0], ids.shape[1], self.vocab), -10.0)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits


def _generate(monkeypatch, script, **kwargs):
    from amptrain import generate, run_setup
    from amptrain.config import TrainConfig

    monkeypatch.setattr(run_setup, "model_factory", lambda cfg, device: lambda: Scripted(script))
    cfg = TrainConfig(device="cpu", precision="fp32", context=64)
    return generate.generate_text(cfg, "Hi", 40, temperature=0, top_k=None, **kwargs)


def test_generation_stops_at_the_end_of_sequence_token_and_at_stop_strings(monkeypatch):
    script = [*b"Hello there. More", 0, *b"never"]  # NUL: the byte tokenizer's EOS
    assert _generate(monkeypatch, script) == "HiHello there. More"
    assert _generate(monkeypatch, script, stop=(". ", "zz")) == "HiHello there"
    assert _generate(monkeypatch, [*b"abc"] * 30) == "Hi" + ("abc" * 14)[:40]  # no EOS: all 40


def test_chat_sends_a_user_turn_and_prints_the_reply_alone(monkeypatch):
    from amptrain.data import ByteTokenizer, chat

    seen = []
    original = chat.prompt_ids
    monkeypatch.setattr(chat, "prompt_ids", lambda p, t: seen.append(original(p, t)) or seen[-1])
    assert _generate(monkeypatch, [*b"Yo!", 0], chat=True) == "Yo!"
    assert bytes(seen[0]) == b"user: Hi\nassistant: " and chat.prompt_ids("Hi", ByteTokenizer())


def test_sampling_settings_out_of_range_are_refused():
    import pytest

    from amptrain.errors import ConfigError
    from amptrain.generate import check_sampling

    for top_p in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"--top-p .* must be in \(0, 1\]"):
            check_sampling(5, 1.0, None, top_p)
