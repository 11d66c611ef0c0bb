"""The `generate` command: sample text from a model (usually a trained run) under autocast.

The prompt is encoded with the run's own tokenizer; each new token is drawn from the
last position's logits divided by the temperature, restricted to the `top_k` most likely
when given (temperature 0 takes the most likely token). The context window slides once the
text is longer than the model's context, as nanoGPT's `generate` does. Sampling is seeded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from amptrain.adapter import extract_logits
from amptrain.config import TrainConfig
from amptrain.errors import ConfigError
from amptrain.precision import Precision


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
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
) -> torch.Tensor:
    """Append `max_new_tokens` sampled tokens to `ids` `[B, T]`; returns `[B, T + new]`."""
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
            next_id = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
    model.train(was_training)
    return ids


def generate_text(
    cfg: TrainConfig, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None
) -> str:
    """The prompt and its sampled continuation, from the model of `cfg` (seeded by its seed)."""
    from amptrain.models.limits import declared_context
    from amptrain.precision import resolve
    from amptrain.run_setup import model_factory, pick_device, tokenizer_for

    check_sampling(max_new_tokens, temperature, top_k)
    tokenizer = tokenizer_for(cfg)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("--prompt is empty: give at least one character to continue")
    if not hasattr(tokenizer, "decode"):
        raise ConfigError(f"the tokenizer {tokenizer.name} cannot decode tokens back to text")
    device = pick_device(cfg.device)
    precision = resolve(cfg.precision, device)
    model = model_factory(cfg, device)()
    context = min(declared_context(model) or cfg.context, cfg.context)
    generator = torch.Generator(device).manual_seed(cfg.fit.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    out = sample(model, x, max_new_tokens, precision, context, temperature, top_k, generator)
    return tokenizer.decode(out[0].tolist())
