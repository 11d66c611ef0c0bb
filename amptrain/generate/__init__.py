"""The `generate` command: sample text from a model (usually a trained run) under autocast.

The prompt is encoded with the run's own tokenizer (with `chat`, as a user turn in its chat
template, ready for the assistant's); each new token is drawn from the last position's logits
divided by the temperature, restricted to the `top_k` most likely and to the smallest set whose
probability reaches `top_p` when given (temperature 0 takes the most likely token). Generation
stops at the tokenizer's end-of-sequence token (or another end-of-turn token its vocabulary
has, `tokenizers.EOS_NAMES`: a chat template may end a turn with `<|eot_id|>` while its
`eos_token` is `<|end_of_text|>`) and at the first `stop` string, none of which is printed.
The context window slides once the text is longer than the model's context, as nanoGPT's
`generate` does. Sampling is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from amptrain.adapter import extract_logits
from amptrain.config import TrainConfig
from amptrain.errors import ConfigError
from amptrain.precision import Precision


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None = None
) -> None:
    """Refuse sampling settings out of range, before a model is loaded.

    Raises:
        ConfigError: Naming the flag, its value and the valid range.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} is invalid: it must be >= 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature {temperature} is invalid: it must be a number >= 0")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k {top_k} is invalid: it must be >= 1 (or left out)")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ConfigError(f"--top-p {top_p} is invalid: it must be in (0, 1] (or left out)")


@torch.no_grad()
def sample(
    model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    precision: Precision,
    context: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
    stop: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Append up to `max_new_tokens` sampled tokens to `ids` `[B, T]`; returns `[B, T + new]`.

    `stop(ids)`, asked after each token, ends generation early when it says True.
    """
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        window = ids[:, -context:]
        with precision.autocast():
            logits = extract_logits(model(window))[:, -1, :].float()
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, -math.inf)
            probs = torch.softmax(logits, dim=-1)
            if top_p is not None:
                probs = nucleus(probs, top_p)
            next_id = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
        if stop is not None and stop(ids):
            break
    model.train(was_training)
    return ids


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` `[B, V]` kept on the smallest set of likeliest tokens whose sum reaches `top_p`.

    A token is kept when the tokens likelier than it sum to less than `top_p`, so the likeliest
    one always is; the kept probabilities are not renormalised (`multinomial` needs no sum 1).
    """
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
    return probs.masked_fill(~keep, 0.0)


def generate_text(
    cfg: TrainConfig,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None = None,
    stop: tuple[str, ...] = (),
    chat: bool = False,
) -> str:
    """The sampled text, from the model of `cfg` (seeded by its seed).

    Plain: the prompt and its continuation. With `chat`: the assistant's reply alone.
    """
    from amptrain.data import chat as chats
    from amptrain.models.limits import declared_context
    from amptrain.precision import resolve
    from amptrain.run_setup import model_factory, pick_device, tokenizer_for

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not prompt:
        raise ConfigError("--prompt is empty: give at least one character to continue")
    if any(not s for s in stop):
        raise ConfigError("--stop '' is invalid: a stop string needs at least one character")
    tokenizer = tokenizer_for(cfg)
    try:
        ids = chats.prompt_ids(prompt, tokenizer) if chat else tokenizer.encode(prompt)
    except chats.TemplateError as exc:
        raise ConfigError(f"--chat: the tokenizer's chat template cannot render a user turn, a "
                          f"conversation {exc}; leave --chat out") from None  # fmt: skip
    if not ids:
        raise ConfigError(f"--prompt {prompt!r} encodes to no token with {tokenizer.name}; give "
                          "text the tokenizer keeps")  # fmt: skip
    device = pick_device(cfg.device)
    precision = resolve(cfg.precision, device)
    model = model_factory(cfg, device)()
    context = min(declared_context(model) or cfg.context, cfg.context)
    generator = torch.Generator(device).manual_seed(cfg.fit.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    ends = Ends(tokenizer, len(ids), stop)
    out = sample(model, x, max_new_tokens, precision, context, temperature, top_k, generator,
                 top_p, ends)  # fmt: skip
    new = ends.text(out[0, len(ids) :].tolist())
    return new if chat else prompt + new


class Ends:
    """When generation ends: the tokenizer's end-of-sequence token, or a stop string.

    Called with the ids so far (`sample`'s `stop`); `text` is the generated text up to the end,
    which is left out.
    """

    def __init__(self, tokenizer: Any, start: int, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.start, self.stop = tokenizer, start, stop
        self.ends = tokenizer.stop_ids

    def __call__(self, ids: torch.Tensor) -> bool:
        """Whether the last token ended generation."""
        new = ids[0, self.start :].tolist()
        if new[-1] in self.ends:
            return True
        return bool(self.stop) and any(s in self.tokenizer.decode(new) for s in self.stop)

    def text(self, new: list[int]) -> str:
        """The generated text, without the end-of-sequence token and from the first stop on."""
        ended = [i for i, token in enumerate(new) if token in self.ends]
        if ended:
            new = new[: ended[0]]
        text = self.tokenizer.decode(new)
        cuts = [text.index(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text
