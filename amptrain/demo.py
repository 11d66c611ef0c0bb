"""`amptrain demo`: the main job on the built-in default, in about a minute on a laptop CPU.

It fine-tunes the built-in tiny GPT on the built-in corpus (the standard library's source
text) with `auto` precision, and prints how far the validation loss fell.
"""

from __future__ import annotations

from pathlib import Path

from amptrain.config import FitOptions, TrainConfig
from amptrain.train import TrainRun, run_training

DEMO_STEPS = 400


def demo_config(out: str | Path = "runs", max_steps: int | None = None) -> TrainConfig:
    """The demo's settings: tiny-gpt (4 x 256, context 128), built-in corpus, auto precision."""
    steps = DEMO_STEPS if max_steps is None else max_steps
    fit = FitOptions(max_steps=steps, batch_size=16, lr=1e-3, eval_every=max(steps // 4, 1))
    return TrainConfig(out=str(out), fit=fit)


def run_demo(
    out: str | Path = "runs", max_steps: int | None = None, progress: bool = True
) -> TrainRun:
    """Run the demo and print its summary; returns the run."""
    from amptrain.cli import _print_summary
    from amptrain.metrics.console import ProgressSink

    cfg = demo_config(out, max_steps)
    sinks = [ProgressSink(cfg.fit.max_steps, "demo")] if progress else []
    run = run_training(cfg, sinks=sinks, command="demo")
    _print_summary(run)
    return run
