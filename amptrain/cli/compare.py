"""`amptrain compare`: the model against a same-size or a pretrained baseline."""

from __future__ import annotations

import argparse
from typing import Any

from amptrain.cli.common import command_options, command_settings, config_from_args, print_ending
from amptrain.config import COMPARE_STEPS

SKIP = ("--max-steps", "--epochs", "--lora", "--lora-alpha", "--lora-dropout", "--lora-targets",
        "--eval-every", "--log-every", "--checkpoint-every", "--keep-last",
        "--checkpoint-format")  # fmt: skip


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `compare` parser."""
    opts = command_options(
        sub, "compare", "compare the model with a same-size or pretrained baseline", SKIP
    )
    add = opts.add
    add("--baseline", default="tiny-gpt", help="tiny-gpt or gpt2: a same-size reference trained "
        "on the same budget; or a local Hugging Face model directory: a pretrained reference, "
        "compared in bits per byte (default: tiny-gpt)")  # fmt: skip
    add("--seeds", default="0,1,2", help="comma-separated seeds of initial weights and batch "
        "order, at least 3; --seed fixes the data split (default: 0,1,2)")  # fmt: skip
    add("--steps", type=int, default=COMPARE_STEPS, help="optimizer steps per training run, "
        f"the budget (default: {COMPARE_STEPS})")  # fmt: skip
    add("--reference-layers", type=int, help="depth of the same-size reference "
        "(default: searched; twice the depth of a tiny-gpt model)")  # fmt: skip
    add("--eval-bytes", type=int, default=32768,
        help="pretrained mode: held-out bytes at the data's end (default: 32768)")  # fmt: skip
    add("--latency-iters", type=int, default=10, help="timed forwards per model (default: 10)")
    add("--no-memory", action="store_true", help="skip the memory measurement")
    return opts.done(run)


def run(args: argparse.Namespace) -> int:
    """Compare, write the run directory, print the table."""
    from amptrain.compare.report import console_table, run_compare

    report, run_dir = run_compare(config_from_args(args), args, settings=command_settings(args))
    print_ending([console_table(report)], "report", run_dir / "report.md")
    return 0
