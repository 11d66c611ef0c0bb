"""`amptrain bench`: the precisions side by side on the user's model."""

from __future__ import annotations

import argparse
from typing import Any

from amptrain.cli.common import (
    NPROC_HELP,
    check_launch,
    command_options,
    command_settings,
    config_from_args,
    print_ending,
    relaunch,
)

# Flags of `train` that `bench` does not take: it sets steps, evaluation and precisions itself.
SKIP = (
    "--max-steps", "--epochs", "--eval-every", "--log-every", "--max-nonfinite", "--precision",
    "--checkpoint-every", "--keep-last",
    "--checkpoint-format", "--init-scale", "--growth-interval",
)  # fmt: skip


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `bench` parser."""
    opts = command_options(sub, "bench", "benchmark precisions side by side on your model", SKIP)
    add = opts.add
    add("--precisions", help="comma-separated arms (default: fp32 and every precision not "
        "emulated here); an arm may add +-joined levers: bf16-true+sr+8bit, bf16+ckpt, "
        "bf16+lora")  # fmt: skip
    add("--steps", type=int, default=30, help="optimizer steps per run (default: 30)")
    add("--warmup-steps", type=int, default=5, help="untimed steps starting each run (default: 5)")
    add("--repeats", type=int, default=3, help="interleaved runs per arm (default: 3)")
    add("--quality-tol", type=float, default=0.02,
        help="relative val-loss difference from fp32 still counted ok (default: 0.02)")  # fmt: skip
    add("--no-memory", action="store_true", help="skip the per-arm memory runs")
    add("--levers", action="store_true",
        help="add the memory levers' arms: bf16+ckpt, bf16+8bit, bf16-true+kahan, bf16-true+sr, "
        "bf16-true+sr+8bit (with --memory-budget: the largest batch each fits)")  # fmt: skip
    add("--nproc", type=int, default=1, help=NPROC_HELP)
    return opts.done(run)


def run(args: argparse.Namespace) -> int:
    """Benchmark, write the run directory, print the table (rank 0 under several processes)."""
    from amptrain import distributed
    from amptrain.bench.report import console_table, run_bench

    cfg = config_from_args(args)
    precisions = args.precisions.split(",") if args.precisions else None
    _check(args, cfg, precisions)  # bad input: one line, before any process starts
    if check_launch(args, cfg):
        return relaunch(args)
    distributed.init_from_env(cfg.device)
    try:
        report, run_dir = run_bench(
            cfg, precisions=precisions, steps=args.steps, warmup=args.warmup_steps,
            repeats=args.repeats, quality_tol=args.quality_tol, memory=not args.no_memory,
            settings=command_settings(args), levers=args.levers,
        )  # fmt: skip
        if run_dir is not None:
            print_ending([console_table(report)], "report", run_dir / "report.md")
    finally:
        distributed.shutdown()
    return 0


def _check(args: argparse.Namespace, cfg: Any, precisions: list[str] | None) -> None:
    """The benchmark's own settings, the arms on this device, the strategy on the processes."""
    from amptrain import distributed
    from amptrain.bench import arm_names, arms, check_settings, ranks
    from amptrain.run_setup import pick_device

    check_settings(args.steps, args.warmup_steps, args.repeats, args.quality_tol)
    if precisions is not None or args.levers:
        arm_names([*(precisions or []), *(arms.MEMORY_ARMS if args.levers else ())],
                  pick_device(cfg.device))  # fmt: skip
    launched = distributed.launched_by_torchrun()
    processes = distributed.world_size_from_env() if launched else args.nproc
    ranks.check_strategy(cfg.fit.strategy, processes)
