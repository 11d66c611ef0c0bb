"""`amptrain generate`: sample text from a model or a trained run."""

from __future__ import annotations

import argparse
from typing import Any

from amptrain.cli.common import command_options, config_from_args

# Train flags `generate` does not take: it trains nothing and reads no corpus.
SKIP = (
    "--lora", "--lora-alpha", "--lora-dropout", "--lora-targets",
    "--init-from", "--data", "--text-field", "--prompt-field", "--completion-field",
    "--long-examples",
    "--data-dtype", "--val-fraction", "--val-data", "--max-steps", "--epochs",
    "--batch-size", "--grad-accum", "--lr", "--warmup", "--weight-decay", "--clip-norm",
    "--eval-every", "--eval-batches", "--log-every", "--max-nonfinite", "--init-scale",
    "--growth-interval", "--checkpoint-every", "--keep-last",
    "--checkpoint-format", "--optimizer-impl", "--attention",
    "--loss", "--compile", "--allocator",
)  # fmt: skip


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `generate` parser."""
    opts = command_options(sub, "generate", "sample text from a model or a trained run", SKIP)
    opts.add("--prompt", required=True, help="text to continue")
    opts.add("--max-new-tokens", type=int, default=100, help="tokens to sample (default: 100)")
    opts.add("--temperature", type=float, default=1.0, help="divide the logits by this; 0 "
             "picks the likeliest token (default: 1.0)")  # fmt: skip
    opts.add("--top-k", type=int, default=None,
             help="sample among the k most likely tokens only (default: all)")  # fmt: skip
    opts.add("--top-p", type=float, default=None,
             help="sample among the likeliest tokens whose probability sums to p (nucleus "
             "sampling; default: all)")  # fmt: skip
    opts.add("--stop", action="append", default=[], metavar="TEXT",
             help="end at this text (not printed); repeat for several; the tokenizer's "
             "end-of-sequence token always ends it")  # fmt: skip
    opts.add("--chat", action="store_true", default=False,
             help="send --prompt as a user turn in the tokenizer's chat template (or the "
             "plain one) and print the assistant's reply")  # fmt: skip
    return opts.done(run)


def run(args: argparse.Namespace) -> int:
    """Print the prompt and its sampled continuation to stdout."""
    from amptrain.generate import generate_text

    print(generate_text(config_from_args(args), args.prompt, args.max_new_tokens,
                        args.temperature, args.top_k, args.top_p, tuple(args.stop),
                        args.chat))  # fmt: skip
    return 0
