"""The `eval` command: score a model (usually a trained run) on a corpus, in a chosen precision.

With `--model runs/train-XYZ` the run's model, tokenizer and final weights are used. The
corpus is `--data` when given (all of it), else the run's own validation split (the same
seed and fraction it trained with). The figures are the token-weighted loss, perplexity and
next-token accuracy, and bits per byte (the summed loss in bits over the UTF-8 bytes of the
scored tokens), which compares models with different tokenizers. They go to `eval.json` in a
new `eval-*` run directory.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from amptrain.config import TrainConfig


def evaluate_model(cfg: TrainConfig, whole_data: bool) -> dict[str, Any]:
    """Build the model and data of `cfg` and score the model; returns the figures.

    Args:
        cfg: The model, data, context, precision, device and batch size to use.
        whole_data: Score every block of `cfg.data`; False scores the validation split.
    """
    from amptrain.run_setup import load_data, prepare, tokenizer_for
    from amptrain.step import evaluate

    model, train, val, precision = prepare(dataclasses.replace(cfg, lora=0))  # merged weights
    blocks = load_data(cfg, tokenizer_for(cfg)) if whole_data else val
    scores = evaluate(model, blocks, precision, cfg.fit.batch_size, None, cfg.fit.ignore_index)
    targets = blocks.labels[:, 1:]
    scored = targets[targets != cfg.fit.ignore_index]
    n_bytes = _utf8_bytes(tokenizer_for(cfg), blocks.labels, cfg.fit.ignore_index)
    total_nats = scores["val/loss"] * scored.numel()
    return {
        "model": cfg.model,
        "data": cfg.data if whole_data else f"{cfg.data} (validation split)",
        "precision": precision.name,
        "precision_reason": precision.reason,
        "blocks": len(blocks),
        "tokens": int(scored.numel()),
        "loss": scores["val/loss"],
        "perplexity": scores["val/perplexity"],
        "accuracy": scores["val/accuracy"],
        "bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1),
    }


def _utf8_bytes(tokenizer: Any, labels: Any, ignore_index: int) -> int:
    """UTF-8 bytes of the scored tokens: each row's targets decoded back to text."""
    from amptrain.data import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):  # one token, one byte (decoding could add U+FFFD)
        return int((labels[:, 1:] != ignore_index).sum())
    total = 0
    for row in labels[:, 1:]:
        ids = [int(i) for i in row if int(i) != ignore_index]
        total += len(tokenizer.decode(ids).encode("utf-8"))
    return total


def with_run_split(cfg: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """For a run as the model: its data, validation fraction and seed, so `val` is its split."""
    from amptrain.models.trained import run_config

    saved = run_config(cfg.model)
    if saved is None:
        return cfg
    seed = cfg.fit.seed if "seed" in given else saved["fit"]["seed"]
    fit = dataclasses.replace(cfg.fit, seed=seed)
    kept = ("text_field", "prompt_field", "completion_field", "long_examples", "data_dtype",
            "val_data")  # read as it trained, its held-out data too  # fmt: skip
    read = {k: saved[k] for k in kept if k in saved}
    return dataclasses.replace(cfg, data=saved["data"], val_fraction=saved["val_fraction"], fit=fit,
                               **read)  # fmt: skip


def run_eval(cfg: TrainConfig, given: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """Score the model of `cfg`, write `eval.json` and `config.json` in a new `eval-*` run.

    `given` are the settings named on the command line: without `data` the run's own
    validation split is scored. Returns the figures and the run directory.
    """
    from amptrain.runs import atomic_write_json, create_run_dir, write_config

    whole_data = "data" in given
    if not whole_data:
        cfg = with_run_split(cfg, given)
    figures = evaluate_model(cfg, whole_data)
    run_dir = create_run_dir(cfg.out, "eval")
    write_config(run_dir, "eval", cfg)
    atomic_write_json(Path(run_dir) / "eval.json", figures)
    return figures, run_dir
