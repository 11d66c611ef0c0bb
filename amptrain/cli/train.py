"""`amptrain train`: fine-tune a model, in one process or several (DDP through torchrun)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

from amptrain.cli.common import (
    add_train_flags,
    config_from_args,
    given_flags,
    print_ending,
    progress_sinks,
)
from amptrain.errors import AmptrainError


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `train` parser."""
    parser = sub.add_parser("train", help="fine-tune a model with fp32/tf32/fp16/bf16")
    add_train_flags(parser)
    parser.add_argument("--resume", help="auto (newest run under --out), a run or checkpoint dir")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine, DDP "
                        "through torch's launcher (default: 1)")  # fmt: skip
    parser.add_argument("--allow-new-scaler", action="store_true",
                        help="resume fp16 from a checkpoint without GradScaler state")  # fmt: skip
    parser.add_argument("--wandb", nargs="?", const="amptrain", default=None, metavar="PROJECT",
                        help="also log to Weights & Biases (project, default amptrain); "
                        "honours WANDB_MODE=offline")  # fmt: skip
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train, print the summary; exit code 0."""
    from amptrain import distributed
    from amptrain.train import run_training

    if args.nproc > 1 and not distributed.launched_by_torchrun():
        return launch(args)
    cfg = config_from_args(args)
    if args.resume:
        given = [f for f in given_flags(args) if f != "--out"]
        if given or args.config:
            raise AmptrainError(
                f"--resume continues a run with the settings in its config.json; leave out "
                f"{', '.join(given) or '--config'}"
            )
    distributed.init_from_env()
    try:
        progress = progress_sinks(args, cfg.fit.max_steps, "train") if distributed.is_main() else []
        if args.wandb is not None and distributed.is_main():
            from amptrain.metrics.wandb_sink import WandbSink

            progress.append(WandbSink(project=args.wandb, config=cfg.to_dict(), dir=cfg.out))
        result = run_training(
            cfg, sinks=progress, resume=args.resume, allow_new_scaler=args.allow_new_scaler
        )
        if distributed.is_main():
            print_summary(result)
    finally:
        distributed.shutdown()
    return 0


def launch(args: argparse.Namespace) -> int:
    """`--nproc N`: run the same command in N processes through torch's elastic launcher.

    `--standalone` keeps the rendezvous on localhost with a free port.
    """
    argv, skip = [], False
    for token in args.argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            argv.append(token)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={args.nproc}", "-m", "amptrain", *argv]  # fmt: skip
    return subprocess.call(launcher)


def summary_rows(run: Any) -> dict[str, object]:
    """The figures of a finished training run, by name."""
    r = run.result
    return {
        "precision": f"{r.precision} ({r.reason})",
        "steps (skipped)": f"{r.steps} ({r.skipped_steps})",
        "val loss: first -> final": f"{r.initial_val_loss:.4f} -> {r.final_val_loss:.4f}",
        "val accuracy": round(r.final_val_accuracy, 4),
        "best val loss (step)": f"{r.best_val_loss:.4f} ({r.best_step})",
        "tokens/s": f"{r.tokens_per_s:,.0f}",
        f"peak memory MB ({r.mem_source})": round(r.peak_mem_mb, 1),
    }


def print_summary(run: Any, title: str = "amptrain train") -> None:
    """The summary table of a training run and its directory."""
    from amptrain.metrics.console import summary_table

    print_ending([summary_table(title, summary_rows(run))], "run directory", run.run_dir)
