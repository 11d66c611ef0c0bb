"""`amptrain train`: fine-tune a model, in one process or several (DDP or FSDP through torchrun)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from amptrain.cli.common import (
    NPROC_HELP,
    add_train_flags,
    check_launch,
    config_from_args,
    given_values,
    print_ending,
    progress_sinks,
    relaunch,
)


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `train` parser."""
    parser = sub.add_parser("train", help="fine-tune a model with fp32/tf32/fp16/bf16")
    add_train_flags(parser)
    parser.add_argument("--resume", help="auto (newest run under --out), a run or checkpoint dir")
    parser.add_argument("--nproc", type=int, default=1, help=NPROC_HELP)
    parser.add_argument("--allow-new-scaler", action="store_true",
                        help="resume fp16 from a checkpoint without GradScaler state")  # fmt: skip
    parser.add_argument("--wandb", nargs="?", const="amptrain", default=None, metavar="PROJECT",
                        help="also log to Weights & Biases (project, default amptrain); "
                        "honours WANDB_MODE=offline")  # fmt: skip
    parser.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                        help="also log to TensorBoard: a run folder under DIR "
                        "(default OUT/tensorboard)")  # fmt: skip
    parser.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                        help="also log to MLflow: a tracking URI (default: a local SQLite "
                        "store OUT/mlflow.db, no server), experiment amptrain")  # fmt: skip
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train, print the summary; exit code 0."""
    from amptrain import distributed
    from amptrain.train import run_training

    cfg = config_from_args(args)
    if check_launch(args, cfg):
        return relaunch(args)
    given = given_values(args) if args.resume else None  # checked against the run's settings
    trackers = Trackers(args, cfg)  # missing packages and logins refused before anything
    distributed.init_from_env(cfg.device)
    try:
        progress = progress_sinks(args, cfg.fit.max_steps, "train") if distributed.is_main() else []
        result = run_training(cfg, sinks=progress, resume=args.resume, given=given,
                              allow_new_scaler=args.allow_new_scaler,
                              trackers=trackers.start)  # fmt: skip
        if distributed.is_main():
            print_summary(result)
    finally:
        trackers.close()  # a run refused after they started leaves no tracker run open
        distributed.shutdown()
    return 0


def _wandb_resume(out: str, resume: str | None) -> dict[str, str]:
    """`wandb.init` arguments that continue the W&B run of the run being resumed, if it had one."""
    if not resume:
        return {}
    from amptrain.resuming import resume_target

    saved = resume_target(out, resume, "train")[0] / "wandb.json"
    if not saved.is_file():
        return {}
    return {"id": json.loads(saved.read_text(encoding="utf-8"))["run_id"], "resume": "allow"}


class Trackers:
    """The W&B, TensorBoard and MLflow sinks `--wandb/--tensorboard/--mlflow` ask for.

    Each is honoured or refused (exit 2, the reason and the fix) before training: a missing
    package or W&B login at once, a tool that cannot start when `start(run_dir)` starts them,
    once the run directory is known, which names each tracker's run.
    """

    def __init__(self, args: argparse.Namespace, cfg: Any) -> None:
        self.args, self.cfg, self.sinks = args, cfg, []
        from amptrain._imports import requires

        instead = "use the run directory's metrics.jsonl"
        if args.wandb is not None:
            from amptrain.metrics.wandb_sink import check_login

            check_login()
        if args.tensorboard is not None:
            requires("tensorboard", "tensorboard", "--tensorboard", instead)
        if args.mlflow is not None:
            requires("mlflow", "mlflow", "--mlflow", instead)

    def start(self, run_dir: Path) -> list:
        """Start the asked-for trackers, each run named after and linked to `run_dir`."""
        args, cfg = self.args, self.cfg
        if args.wandb is not None:
            from amptrain.metrics.wandb_sink import WandbSink

            resumed = _wandb_resume(cfg.out, args.resume)
            self.sinks.append(WandbSink(project=args.wandb, config=cfg.to_dict(), dir=cfg.out,
                                        run_dir=run_dir, required=True,
                                        **resumed))  # fmt: skip
        if args.tensorboard is not None:
            from amptrain.metrics.tensorboard_sink import TensorBoardSink

            parent = Path(args.tensorboard or Path(cfg.out) / "tensorboard")
            self.sinks.append(TensorBoardSink(parent / run_dir.name, config=cfg.to_dict(),
                                              required=True))  # fmt: skip
        if args.mlflow is not None:
            from amptrain.metrics.mlflow_sink import MlflowSink, tracking_uri

            uri = tracking_uri(args.mlflow, cfg.out)
            self.sinks.append(MlflowSink(uri, config=cfg.to_dict(), run_dir=run_dir,
                                         required=True))  # fmt: skip
        return self.sinks

    def close(self) -> None:
        """Close every tracker started (closing twice is harmless)."""
        for sink in self.sinks:
            sink.close()


def summary_rows(run: Any) -> dict[str, object]:
    """The figures of a finished training run, by name."""
    r = run.result
    return {
        "precision": f"{r.precision} ({r.reason})",
        "steps (skipped)": f"{r.steps} ({r.skipped_steps})",
        "val loss: first -> final": f"{r.initial_val_loss:.4f} -> {r.final_val_loss:.4f}",
        "val accuracy": round(r.final_val_accuracy, 4),
        "best val loss (step)": f"{r.best_val_loss:.4f} ({r.best_step})",
        "tokens/s (whole run, evaluation excluded)": f"{r.tokens_per_s:,.0f}",
        f"peak memory MB ({r.mem_source})": round(r.peak_mem_mb, 1),
    }


def print_summary(run: Any, title: str = "amptrain train") -> None:
    """The summary table of a training run and its directory."""
    from amptrain.metrics.console import summary_table

    print_ending([summary_table(title, summary_rows(run))], "run directory", run.run_dir)
