"""`amptrain doctor`: which layer overflows or diverges in fp16/bf16, and is AMP on at all."""

from __future__ import annotations

import argparse
from typing import Any

from amptrain.cli.common import command_options, command_settings, config_from_args, print_ending

# Train flags the doctor does not take (it runs a few fixed passes, not a training run).
SKIP = (
    "--max-steps", "--epochs", "--grad-accum", "--warmup", "--clip-norm", "--eval-every",
    "--eval-batches",
    "--log-every", "--max-nonfinite", "--checkpoint-every", "--keep-last",
    "--checkpoint-format", "--growth-interval",
)  # fmt: skip


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `doctor` parser."""
    opts = command_options(
        sub, "doctor", "find the layer that overflows or diverges in fp16/bf16", SKIP
    )
    add = opts.add
    add("--precisions", help="AMP precisions to compare with fp32, comma-separated "
        "(default: fp16 and bf16 where the device serves them)")  # fmt: skip
    add("--batches", type=int, default=2, help="batches measured for headroom (default: 2)")
    add("--margin-bits", type=float, default=2.0, help="flag modules with less fp16 headroom "
        "than this, in powers of two (default: 2.0)")  # fmt: skip
    add("--fix", action="store_true",
        help="run flagged modules of a copy in fp32 and check fp16 again")  # fmt: skip
    return opts.done(run)


def run(args: argparse.Namespace) -> int:
    """Build model and data like `train`, diagnose, write the run directory, print the tables."""
    from amptrain.doctor import run_doctor
    from amptrain.doctor.records import console_tables

    cfg = config_from_args(args)
    precisions = args.precisions.split(",") if args.precisions else None
    report, path = run_doctor(
        cfg,
        precisions,
        batches=args.batches,
        margin_bits=args.margin_bits,
        fix=args.fix,
        settings=command_settings(args),
    )
    print_ending(console_tables(report), "report", path)
    return 0
