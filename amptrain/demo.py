"""`amptrain demo`: the main job on the built-in default, end to end, in under three minutes on CPU.

It fine-tunes the built-in tiny GPT on the built-in corpus (the standard library's source
text) with `auto` precision, then benchmarks fp32 and every precision this device does not
emulate (the capability probe decides; an emulated one is a row saying it was skipped, since
timing it could take a quarter of an hour), starting from the fine-tuned weights, and writes
one report folder.
"""

from __future__ import annotations

from pathlib import Path

from amptrain.config import FitOptions, TrainConfig
from amptrain.train import TrainRun, run_training

DEMO_STEPS = 300


def demo_config(out: str | Path = "runs", max_steps: int | None = None) -> TrainConfig:
    """The demo's settings: tiny-gpt (4 x 256, context 128), built-in corpus, auto precision."""
    steps = DEMO_STEPS if max_steps is None else max_steps
    fit = FitOptions(max_steps=steps, batch_size=16, lr=1e-3, eval_every=max(steps // 3, 1))
    return TrainConfig(out=str(out), fit=fit)


def run_demo(
    out: str | Path = "runs",
    max_steps: int | None = None,
    progress: bool = True,
    bench_steps: int = 20,
    bench_repeats: int = 3,
) -> tuple[TrainRun, object]:
    """Fine-tune, benchmark, print both summaries; returns the run and the `BenchReport`."""
    from amptrain.bench import bench
    from amptrain.bench_report import console_table, write_report
    from amptrain.cli import _console, _print_summary, train_summary_rows
    from amptrain.metrics.console import ProgressSink

    cfg = demo_config(out, max_steps)
    sinks = [ProgressSink(cfg.fit.max_steps, "demo: fine-tune")] if progress else []
    run = run_training(cfg, sinks=sinks, command="demo")
    _print_summary(run)
    report = bench(
        run.model, run.train, run.val, steps=bench_steps, warmup=min(4, bench_steps - 2),
        repeats=bench_repeats, batch_size=cfg.fit.batch_size, lr=3e-4, seed=cfg.fit.seed,
    )  # fmt: skip
    rows = train_summary_rows(run)
    preface = "# Fine-tune\n\n" + "\n".join(f"- {k}: {v}" for k, v in rows.items()) + "\n\n"
    write_report(report, run.run_dir, preface=preface)
    console = _console(stdout=True)
    console.print(console_table(report))
    console.print(f"report: {run.run_dir / 'report.md'}", soft_wrap=True, highlight=False)
    return run, report
