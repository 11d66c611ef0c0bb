"""The `amptrain` command: argparse subcommands, one handler each.

Handlers import their workflow lazily, so `amptrain --help` answers fast and needs no extra.
Settings come from the built-in defaults, then an optional `--config run.json` (for example a
previous run's `config.json`), then the flags given on the command line.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amptrain.errors import AmptrainError, Interrupted

# Flag -> (TrainConfig or FitOptions field, type, help). "fit." marks loop options.
_TRAIN_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--model": ("model", str, "tiny-gpt, file.py:Name, a run directory, or a Hugging Face dir"),
    "--model-kwargs": ("model_kwargs", json.loads, "JSON object of model constructor arguments"),
    "--init-from": ("init_from", str, "start from the weights of a run, checkpoint or model.pt"),
    "--data": ("data", str, "builtin (standard-library corpus), a text file, or a folder"),
    "--tokenizer": ("tokenizer", str, "a local tokenizer.json (default: UTF-8 bytes)"),
    "--context": ("context", int, "tokens per training block"),
    "--val-fraction": ("val_fraction", float, "fraction of blocks held out for validation"),
    "--precision": ("precision", str, "fp32, tf32, fp16, bf16, auto, or bf16-mixed/16-mixed/..."),
    "--device": ("device", str, "auto, cpu, cuda, cuda:1, ..."),
    "--out": ("out", str, "folder for run directories"),
    "--max-steps": ("fit.max_steps", int, "optimizer steps"),
    "--batch-size": ("fit.batch_size", int, "blocks per micro-batch"),
    "--grad-accum": ("fit.grad_accum", int, "micro-batches per optimizer step"),
    "--lr": ("fit.lr", float, "peak learning rate"),
    "--warmup": ("fit.warmup", float, "fraction of steps in linear warm-up"),
    "--weight-decay": ("fit.weight_decay", float, "AdamW weight decay on matrices"),
    "--clip-norm": ("fit.clip_norm", float, "gradient-norm clip; 0 disables clipping"),
    "--eval-every": ("fit.eval_every", int, "evaluate every N optimizer steps"),
    "--eval-batches": ("fit.eval_batches", int, "validation batches per evaluation"),
    "--log-every": ("fit.log_every", int, "write step metrics every N steps"),
    "--seed": ("fit.seed", int, "seed of initial weights, data split and batch order"),
    "--max-nonfinite": ("fit.max_nonfinite", int, "stop after N consecutive non-finite steps"),
    "--init-scale": ("fit.init_scale", float, "fp16: first loss scale of the GradScaler"),
    "--growth-interval": ("fit.growth_interval", int, "fp16: finite steps before scale growth"),
    "--checkpoint-every": ("fit.checkpoint_every", int, "checkpoint every N steps (0: at the end)"),
    "--keep-last": ("fit.keep_last", int, "complete checkpoints to keep"),
    "--optimizer-impl": (
        "fit.optimizer_impl",
        str,
        "AdamW kernel: auto (fused), fused, foreach, for-loop",
    ),
    "--attention": ("fit.attention", str, "SDPA backend: auto (measured), default, math"),
}
# Flags of `train` that `bench` does not take: it sets steps, evaluation and precisions itself.
_BENCH_SKIPS = (
    "--max-steps", "--eval-every", "--log-every", "--max-nonfinite", "--precision",
    "--checkpoint-every", "--keep-last", "--init-scale", "--growth-interval",
)  # fmt: skip
# tiny-gpt size flags, mapped into model_kwargs.
_GPT_FLAGS = {
    "--layers": "n_layer", "--width": "n_embd", "--heads": "n_head", "--dropout": "dropout",
}  # fmt: skip


def _add_train_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for flag, (_, kind, help_text) in _TRAIN_FLAGS.items():
        if flag not in skip:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
    for flag, field in _GPT_FLAGS.items():
        kind = float if field == "dropout" else int
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"tiny-gpt {field}")
    parser.add_argument("--compile", action="store_true", default=argparse.SUPPRESS,
                        help="compile the model in place (torch.compile)")  # fmt: skip
    parser.add_argument("--config", type=Path, help="a JSON config (e.g. a run's config.json)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")


def config_from_args(args: argparse.Namespace) -> Any:
    """Defaults, then `--config`, then explicit flags: a validated `TrainConfig`."""
    from amptrain.config import TrainConfig

    return TrainConfig.from_dict(given_values(args))


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings `--config` and the explicit flags give, nested like `TrainConfig.to_dict()`."""
    values: dict[str, Any] = {"fit": {}}
    if args.config is not None:
        from amptrain.config_file import load_config_file

        loaded = load_config_file(args.config)
        values = {**loaded, "fit": dict(loaded.get("fit", {}))}
    given = vars(args)
    for flag, (field, _, _) in _TRAIN_FLAGS.items():
        name = flag[2:].replace("-", "_")
        if name in given:
            value = given[name]
            if field == "fit.clip_norm" and value == 0:
                value = None
            if field.startswith("fit."):
                values["fit"][field[4:]] = value
            else:
                values[field] = value
    if given.get("compile"):
        values["fit"]["compile"] = True
    sizes = {f: given[flag[2:]] for flag, f in _GPT_FLAGS.items() if flag[2:] in given}
    if sizes:
        if values.get("model", "tiny-gpt") != "tiny-gpt":
            raise AmptrainError(
                f"--layers/--width/--heads/--dropout size the built-in tiny-gpt only; for "
                f"{values['model']} pass --model-kwargs"
            )
        values["model_kwargs"] = {**values.get("model_kwargs", {}), **sizes}
    if "context" not in values and "model" in values:
        from amptrain.models.trained import run_config

        saved = run_config(values["model"])  # a trained run as the model: its own context
        if saved is not None:
            values["context"] = saved["context"]
    return values


def _run_train(args: argparse.Namespace) -> int:
    from amptrain import distributed
    from amptrain.train import run_training

    if args.nproc > 1 and not distributed.launched_by_torchrun():
        return _launch(args)
    cfg = config_from_args(args)
    given = given_values(args) if args.resume else None
    distributed.init_from_env()
    try:
        progress = _progress(args, cfg.fit.max_steps, "train") if distributed.is_main() else []
        if distributed.is_main():
            progress += _tracking_sinks(args, cfg)
        run = run_training(cfg, sinks=progress, resume=args.resume, given=given,
                           allow_new_scaler=args.allow_new_scaler)  # fmt: skip
        if distributed.is_main():
            _print_summary(run)
    finally:
        distributed.shutdown()
    return 0


def _wandb_resume(out: str, resume: str | None) -> dict[str, str]:
    """`wandb.init` arguments that continue the W&B run of the run being resumed, if it had one."""
    if not resume:
        return {}
    from amptrain.train import resume_target

    saved = resume_target(out, resume, "train")[0] / "wandb.json"
    if not saved.is_file():
        return {}
    return {"id": json.loads(saved.read_text(encoding="utf-8"))["run_id"], "resume": "allow"}


def _tracking_sinks(args: argparse.Namespace, cfg: Any) -> list:
    """The W&B, TensorBoard and MLflow sinks asked for by `--wandb/--tensorboard/--mlflow`."""
    sinks: list = []
    if args.wandb is not None:
        from amptrain.metrics.wandb_sink import WandbSink

        resumed = _wandb_resume(cfg.out, args.resume)
        sinks.append(WandbSink(project=args.wandb, config=cfg.to_dict(), dir=cfg.out, **resumed))
    if args.tensorboard is not None:
        from amptrain.metrics.tensorboard_sink import TensorBoardSink

        parent = Path(args.tensorboard or Path(cfg.out) / "tensorboard")
        name = time.strftime("train-%Y%m%d-%H%M%S")  # one TensorBoard run per training run
        sinks.append(TensorBoardSink(parent / name, config=cfg.to_dict()))
    if args.mlflow is not None:
        from amptrain.metrics.mlflow_sink import MlflowSink, local_store

        uri = args.mlflow or local_store(Path(cfg.out) / "mlflow.db")
        sinks.append(MlflowSink(uri, config=cfg.to_dict()))
    return sinks


def _launch(args: argparse.Namespace) -> int:
    """`--nproc N`: run the same command in N processes through torch's elastic launcher.

    `--standalone` keeps the rendezvous on localhost with a free port.
    """
    import subprocess

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


def _run_bench(args: argparse.Namespace) -> int:
    from amptrain.bench_report import console_table, run_bench

    cfg = config_from_args(args)
    precisions = args.precisions.split(",") if args.precisions else None
    report, run_dir = run_bench(
        cfg, precisions=precisions, steps=args.steps, warmup=args.warmup_steps,
        repeats=args.repeats, quality_tol=args.quality_tol, memory=not args.no_memory,
    )  # fmt: skip
    console = _console(stdout=True)
    console.print(console_table(report))
    console.print(f"report: {run_dir / 'report.md'}", soft_wrap=True, highlight=False)
    return 0


# Workflows in their own modules. Each module defines `SKIP_TRAIN_FLAGS` (train flags it does
# not take), `add_cli_arguments(parser)` and `cli_main(args, cfg) -> int`, and imports its
# optional dependencies inside functions, so building this parser stays light.
_WORKFLOWS = {
    "search": ("amptrain.search", "search hyperparameters and precision with Optuna"),
    "compare": ("amptrain.compare", "compare the model with a same-size or pretrained baseline"),
    "doctor": ("amptrain.doctor", "find the layer that overflows or diverges in fp16/bf16"),
    "eval": ("amptrain.eval_run", "score a model or a trained run on a corpus"),
    "generate": ("amptrain.generate", "sample text from a model or a trained run"),
}


def _add_workflows(sub: Any) -> None:
    for name, (module_name, help_text) in _WORKFLOWS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        parser = sub.add_parser(name, help=help_text)
        _add_train_flags(parser, skip=module.SKIP_TRAIN_FLAGS)
        module.add_cli_arguments(parser)
        parser.set_defaults(func=functools.partial(_run_workflow, module))


def _run_workflow(module: Any, args: argparse.Namespace) -> int:
    return module.cli_main(args, config_from_args(args))


def _run_demo(args: argparse.Namespace) -> int:
    from amptrain.demo import run_demo

    run_demo(out=args.out, max_steps=args.max_steps, progress=not args.no_progress)
    return 0


def _progress(args: argparse.Namespace, total: int, what: str) -> list:
    if args.no_progress:
        return []
    from amptrain.metrics.console import ProgressSink

    return [ProgressSink(total, what)]


def train_summary_rows(run: Any) -> dict[str, object]:
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


def _print_summary(run: Any) -> None:
    from amptrain.metrics.console import summary_table

    rows = train_summary_rows(run)
    console = _console(stdout=True)
    console.print(summary_table("amptrain train", rows))
    console.print(f"run directory: {run.run_dir}", soft_wrap=True, highlight=False)


def _console(stdout: bool = False) -> Any:
    from amptrain.metrics.console import Console, stderr_console

    return Console() if stdout else stderr_console()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `amptrain`."""
    parser = argparse.ArgumentParser(
        prog="amptrain", description="Train your own transformer with mixed precision."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a model with fp32/tf32/fp16/bf16")
    _add_train_flags(train)
    train.add_argument("--resume", help="auto (newest run under --out), a run or checkpoint dir")
    train.add_argument("--nproc", type=int, default=1,
                       help="processes on this machine (DDP through torch's launcher)")  # fmt: skip
    train.add_argument("--allow-new-scaler", action="store_true",
                       help="resume fp16 from a checkpoint without GradScaler state")  # fmt: skip
    train.add_argument("--wandb", nargs="?", const="amptrain", default=None, metavar="PROJECT",
                       help="also log to Weights & Biases (project, default amptrain); "
                       "honours WANDB_MODE=offline")  # fmt: skip
    train.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                       help="also log to TensorBoard: a run folder under DIR "
                       "(default OUT/tensorboard)")  # fmt: skip
    train.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                       help="also log to MLflow: a tracking URI (default: a local SQLite "
                       "store OUT/mlflow.db, no server), experiment amptrain")  # fmt: skip
    train.set_defaults(func=_run_train)
    bench = sub.add_parser("bench", help="benchmark precisions side by side on your model")
    _add_train_flags(bench, skip=_BENCH_SKIPS)
    bench.add_argument(
        "--precisions",
        help="comma-separated arms (default: fp32 and every precision not emulated here)",
    )
    bench.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    bench.add_argument(
        "--warmup-steps", type=int, default=5, help="untimed steps starting each run"
    )
    bench.add_argument("--repeats", type=int, default=3, help="interleaved runs per arm")
    bench.add_argument("--quality-tol", type=float, default=0.02,
                       help="relative val-loss difference from fp32 still counted ok")  # fmt: skip
    bench.add_argument("--no-memory", action="store_true", help="skip the per-arm memory runs")
    bench.set_defaults(func=_run_bench)
    _add_workflows(sub)
    demo = sub.add_parser("demo", help="train the built-in model on the built-in corpus")
    demo.add_argument("--out", default="runs", help="folder for run directories")
    demo.add_argument("--max-steps", type=int, default=None, help="override the demo's steps")
    demo.add_argument("--no-progress", action="store_true", help="no live progress bar")
    demo.set_defaults(func=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code, one meaning each (`amptrain.errors.EXIT_CODES`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except Interrupted as exc:
        out = getattr(args, "out", None) or "runs"
        hint = f"; resume with: amptrain train --resume auto --out {out}" if exc.checkpoint else ""
        _say(f"amptrain: {exc}{hint}")
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        _say("amptrain: aborted by Ctrl-C; complete checkpoints are kept, partial ones removed")
        return 130
    except BaseException as exc:  # noqa: BLE001 - sorted below; anything else is a bug
        code = exit_code(exc)
        if code is None:
            raise
        _say(f"amptrain: {_LABELS[code]}: {exc}")
        return code


_LABELS = {1: "training stopped", 2: "error", 3: "environment error"}


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an expected failure; None for an unexpected one (a bug: traceback)."""
    if isinstance(exc, AmptrainError):
        return exc.exit_code
    if isinstance(exc, (FileNotFoundError, ModuleNotFoundError, ValueError, TypeError)):
        return 2  # input that names a missing file, an absent extra, or a bad value
    if isinstance(exc, (OSError, MemoryError)) or type(exc).__name__ == "OutOfMemoryError":
        return 3  # disk full, read-only folder, no permission, memory exhausted
    return None


def _say(line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logger = logging.getLogger("amptrain")
    logger.handlers[:] = [RichHandler(console=_console(), show_path=False, show_time=False)]
    level = logging.DEBUG if verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:
        level = logging.WARNING  # the other ranks speak only when something is wrong
    logger.setLevel(level)
    logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
