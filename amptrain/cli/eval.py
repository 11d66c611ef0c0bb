"""`amptrain eval`: score a model or a trained run on a corpus, in a chosen precision."""

from __future__ import annotations

import argparse
from typing import Any

from amptrain.cli.common import command_options, config_from_args, print_ending

# Train flags `eval` does not take: it trains nothing.
SKIP = (
    "--lora", "--lora-alpha", "--lora-dropout", "--lora-targets",
    "--init-from", "--val-fraction", "--val-data", "--max-steps", "--epochs", "--grad-accum",
    "--lr", "--warmup",
    "--weight-decay", "--clip-norm", "--eval-every", "--eval-batches", "--log-every",
    "--max-nonfinite", "--init-scale", "--growth-interval", "--checkpoint-every", "--keep-last",
    "--checkpoint-format",
    "--optimizer-impl", "--attention", "--loss", "--compile", "--allocator",
)  # fmt: skip


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `eval` parser: the train flags that choose model, data and precision."""
    return command_options(sub, "eval", "score a model or a trained run on a corpus", SKIP).done(
        run
    )


def run(args: argparse.Namespace) -> int:
    """Score, write `eval.json`, print the figures."""
    from amptrain.eval import run_eval
    from amptrain.metrics.console import summary_table

    figures, run_dir = run_eval(config_from_args(args), vars(args))
    print_ending([summary_table("amptrain eval", figures)], "eval.json", run_dir / "eval.json")
    return 0
