"""Scoring text for `amptrain compare`'s pretrained mode: windows, bits per byte, latency.

Each model reads the same text through its own tokenizer; `score_tokens` sums next-token
cross-entropy over overlapping windows so that every token but the first is scored once,
which turns into bits per byte independently of the tokenizer. Also the local Hugging Face
baseline's loading and checks, and a synchronised latency measurement.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain.adapter import (
    IGNORE_INDEX,
    count_targets,
)
from amptrain.data import Blocks, ByteTokenizer
from amptrain.errors import ConfigError, ModelError
from amptrain.precision import Precision
from amptrain.step import evaluate

REFERENCES = ("tiny-gpt", "gpt2")
MAX_WINDOW = 1024

log = logging.getLogger("amptrain")

log = logging.getLogger("amptrain")


def text_windows(n_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """Windows `(start, end, first_scored)` that score every token but the first exactly once.

    Each window after the first ends half a window later and scores only its new tokens, so
    they are predicted with at least half a window of context. All windows have the same
    length, `min(window, n_tokens)`, so they batch.
    """
    stride, spans, done = max(1, window // 2), [], 1
    while done < n_tokens:
        end = min(done + stride if spans else window, n_tokens)
        spans.append((max(0, end - window), end, done))
        done = end
    return spans


def score_tokens(
    model: nn.Module, ids: torch.Tensor, window: int, precision: Precision, batch_size: int = 8
) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) of a 1-D token stream, and the tokens scored.

    The windows become blocks whose context-only positions are ignored, scored by the same
    `evaluate` that training uses.
    """
    spans = text_windows(ids.numel(), window)
    x = torch.stack([ids[s:e] for s, e, _ in spans])
    y = x.clone()
    for row, (start, _, first) in enumerate(spans):
        y[row, : first - start] = IGNORE_INDEX  # context only, scored by an earlier window
    metrics = evaluate(
        model, Blocks(x, y, "text"), precision, batch_size, ignore_index=IGNORE_INDEX
    )
    count = count_targets(y)
    return metrics["val/loss"] * count, count


def check_baseline_dir(path: str | Path) -> Path:
    """The baseline directory, if it exists and holds a model's config.json.

    Raises:
        FileNotFoundError: If the directory does not exist.
        ModelError: If it holds no config.json.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"baseline directory not found: {path}; pass a local Hugging Face model directory "
            f"(config.json, weights, tokenizer) or one of {', '.join(REFERENCES)}"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"baseline {path} holds no model: config.json is missing (save one with "
            "model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
        )
    return path


# What AutoTokenizer reads; without one of them it would build an empty tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")


def load_baseline(path: str | Path) -> tuple[nn.Module, Any]:
    """Load a local Hugging Face causal LM and its tokenizer, never from the network.

    Raises:
        FileNotFoundError: If the directory does not exist.
        ModelError: If it holds no config.json or tokenizer, or loading fails.
    """
    path = check_baseline_dir(path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"the baseline directory {path} has no tokenizer (none of "
            f"{', '.join(_TOKENIZER_FILES)}); save the model's with tokenizer.save_pretrained"
            f"({str(path)!r})"
        )
    from amptrain._imports import requires

    requires("transformers", "hf", f"the pretrained baseline {path}", "use --baseline tiny-gpt")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"loading the baseline model and tokenizer in {path} failed: {exc}"
        ) from exc
    return model, tokenizer


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """`text` as a tensor of token ids, without the BOS/EOS a Hugging Face tokenizer may add."""
    if hasattr(tokenizer, "backend_tokenizer"):  # Hugging Face: no BOS/EOS, no length warning
        ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    elif "add_special_tokens" in inspect.signature(tokenizer.encode).parameters:
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long)


def tokenizer_name(tokenizer: Any) -> str:
    """How the report names a tokenizer: its name or type and its vocabulary size."""
    if isinstance(tokenizer, ByteTokenizer):
        return "bytes"
    name = getattr(tokenizer, "name_or_path", None) or getattr(tokenizer, "name", None)
    size = (
        len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", "?")
    )
    return f"{name or type(tokenizer).__name__} ({size} tokens)"


def scoring_window(model: nn.Module, fallback: int | None) -> int:
    """The context the model's config declares (at most `MAX_WINDOW`), else `fallback`.

    Raises:
        ConfigError: If the config declares none and there is no fallback.
    """
    cfg = getattr(model, "config", None)
    for attr in ("block_size", "n_positions", "max_position_embeddings"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 1:
            return min(value, MAX_WINDOW)
    if fallback is None:
        raise ConfigError(f"cannot tell the context of {type(model).__name__}: pass context=")
    return fallback


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # otherwise the clock measures only kernel queuing


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, prec: Precision, iters: int) -> float:
    """Median milliseconds of `iters` forwards of `x` in eval mode, after 3 warm-up forwards."""
    was_training = model.training
    model.eval()
    times = []
    for i in range(3 + max(iters, 1)):
        _sync(x.device)
        start = time.perf_counter()
        with prec.autocast():
            model(x)
        _sync(x.device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(times) * 1e3
