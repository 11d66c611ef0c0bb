"""`amptrain demo`: the main job on the built-in default, end to end, in under three minutes on CPU.

It fine-tunes the built-in tiny GPT on the built-in corpus (the standard library's source
text) with `auto` precision, then benchmarks fp32 and every precision this device does not
emulate (the capability probe decides; an emulated one is a row saying it was skipped, since
timing it could take a quarter of an hour), starting from the fine-tuned weights, and writes
one report folder. It is built from the public `train` and `bench` APIs only.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from amptrain.cli.train import print_summary, summary_rows

DEMO_STEPS = 240  # with the bench, under three minutes on a quiet 2-core CPU in fp32


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `demo` parser."""
    parser = sub.add_parser("demo", help="train the built-in model on the built-in corpus")
    parser.add_argument("--out", default="runs", help="folder for run directories (default: runs)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help=f"override the demo's steps (default: {DEMO_STEPS})")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    run_demo(out=args.out, max_steps=args.max_steps, progress=not args.no_progress)
    return 0


def demo_config(out: str | Path = "runs", max_steps: int | None = None) -> Any:
    """The demo's settings: tiny-gpt (4 x 256, context 128), built-in corpus, auto precision."""
    from amptrain.config import FitOptions, TrainConfig

    steps = DEMO_STEPS if max_steps is None else max_steps
    fit = FitOptions(max_steps=steps, batch_size=16, lr=1e-3, eval_every=max(steps // 3, 1))
    return TrainConfig(out=str(out), fit=fit)


def run_demo(
    out: str | Path = "runs",
    max_steps: int | None = None,
    progress: bool = True,
    bench_steps: int = 20,
    bench_repeats: int = 3,
) -> tuple[Any, Any]:
    """Fine-tune, benchmark, print both summaries; returns the `TrainRun` and the `BenchReport`."""
    from amptrain.bench import bench
    from amptrain.bench.report import console_table, write_report
    from amptrain.cli.common import print_ending
    from amptrain.metrics.console import ProgressSink
    from amptrain.train import run_training

    cfg = demo_config(out, max_steps)
    sinks = [ProgressSink(cfg.fit.max_steps, "demo: fine-tune")] if progress else []
    run = run_training(cfg, sinks=sinks, command="demo")
    print_summary(run, title="amptrain demo: fine-tune")
    report = bench(
        run.model, run.train, run.val, steps=bench_steps, warmup=min(4, bench_steps - 2),
        repeats=bench_repeats, batch_size=cfg.fit.batch_size, lr=3e-4, seed=cfg.fit.seed,
    )  # fmt: skip
    rows = summary_rows(run)
    preface = "# Fine-tune\n\n" + "\n".join(f"- {k}: {v}" for k, v in rows.items()) + "\n\n"
    write_report(report, run.run_dir, preface=preface)
    print_ending([console_table(report)], "report", run.run_dir / "report.md")
    return run, report
