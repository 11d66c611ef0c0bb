"""What every command shares: the training flags, the config they build, and the console ending.

Settings come from the built-in defaults, then an optional `--config run.json` (for example a
previous run's `config.json`), then the flags given on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from amptrain.errors import AmptrainError
from amptrain.flags import train_flags

# tiny-gpt size flags, mapped into model_kwargs.
GPT_FLAGS = {
    "--layers": "n_layer", "--width": "n_embd", "--heads": "n_head", "--dropout": "dropout",
}  # fmt: skip


def add_train_flags(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
    """The model, data and loop flags of `train`, less those in `skip`, plus `--config`."""
    skip = set(skip)
    for f in train_flags():
        if f.flag not in skip:
            parser.add_argument(f.flag, type=f.kind, default=argparse.SUPPRESS,
                                help=f"{f.help} (default: {f.default})")  # fmt: skip
    for flag, field in GPT_FLAGS.items():
        kind = float if field == "dropout" else int
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                            help=f"tiny-gpt {field} (default: the built-in size)")  # fmt: skip
    if "--compile" not in skip:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--compile", action="store_true", default=argparse.SUPPRESS,
                           help="always compile the step (torch.compile); default: compile "
                           "when the run is long enough to repay the compile time")  # fmt: skip
        group.add_argument("--no-compile", action="store_true", default=argparse.SUPPRESS,
                           help="never compile the step")  # fmt: skip
    parser.add_argument("--config", type=Path, help="settings in JSON, YAML or TOML, e.g. a "
                        "run's config.json; flags given as well win")  # fmt: skip
    parser.add_argument("--trust-model-code", action="store_true", default=False,
                        help="import the model file a run directory names even if this machine "
                        "has not trained from it (it runs with your privileges)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")


def command_options(sub: Any, name: str, help_text: str, skip: Iterable[str] = ()) -> Options:
    """A command's parser with the train flags it takes (all but `skip`), ready for its own."""
    parser = sub.add_parser(name, help=help_text)
    add_train_flags(parser, skip=skip)
    return Options(parser)


class Options:
    """Adds a command's own options to its parser and remembers their names.

    Those names are the command's settings: its run directory's `config.json` records them
    under the command's name, and `--config` gives them back as defaults.
    """

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.names: list[str] = []

    def add(self, *flags: str, group: Any = None, **kwargs: Any) -> argparse.Action:
        """`parser.add_argument` (or `group.add_argument`), remembering the option's name."""
        action = (group or self.parser).add_argument(*flags, **kwargs)
        self.names.append(action.dest)
        return action

    def done(self, func: Any) -> argparse.ArgumentParser:
        """Set the handler; returns the parser."""
        self.parser.set_defaults(func=func, settings=tuple(self.names))
        return self.parser


def command_settings(args: argparse.Namespace, secret: tuple[str, ...] = ()) -> dict[str, Any]:
    """The command's own options as JSON-ready values (`secret` ones left out)."""
    values = {n: getattr(args, n) for n in getattr(args, "settings", ()) if n not in secret}
    return {n: str(v) if isinstance(v, Path) else v for n, v in values.items()}


def read_config(path: Path) -> dict[str, Any]:
    """A `--config` file's object (JSON, YAML or TOML); errors name the file."""
    from amptrain.config_file import read_config_object

    return read_config_object(path)


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
    for f in train_flags():
        name = f.flag[2:].replace("-", "_")
        if name in given:
            value = given[name]
            if f.field == "fit.clip_norm" and value == 0:
                value = None
            if f.field.startswith("fit."):
                values["fit"][f.field[4:]] = value
            else:
                values[f.field] = value
    if "epochs" in given and "max_steps" in given:
        raise AmptrainError(f"--epochs {given['epochs']} and --max-steps {given['max_steps']} "
                            "both say how long to train; give one")  # fmt: skip
    if "max_steps" in given and values.get("epochs") is not None:
        values["epochs"] = None  # the flag wins over a config file's epochs
    sizes = {f: given[flag[2:]] for flag, f in GPT_FLAGS.items() if flag[2:] in given}
    if sizes:
        if values.get("model", "tiny-gpt") != "tiny-gpt":
            raise AmptrainError(
                f"--layers/--width/--heads/--dropout size the built-in tiny-gpt only; for "
                f"{values['model']} pass --model-kwargs"
            )
        kwargs = values.get("model_kwargs", {})
        if not isinstance(kwargs, dict):  # TrainConfig says so without the sizes; say it here
            raise AmptrainError(f"model_kwargs must be a JSON object, got {kwargs!r}")
        values["model_kwargs"] = {**kwargs, **sizes}
    if given.get("compile") or given.get("no_compile"):
        values["fit"]["compile"] = bool(given.get("compile"))
    if "context" not in values and "model" in values:
        from amptrain.models.trained import run_config

        saved = run_config(values["model"])  # a trained run as the model: its own context
        if saved is not None:
            values["context"] = saved["context"]
    return values


NPROC_HELP = (
    "processes on this machine, through torch's launcher; --strategy says how they "
    "share the model (default: 1)"
)


def check_launch(args: argparse.Namespace, cfg: Any) -> bool:
    """True when `--nproc N` must start N processes; what they would refuse is refused first.

    In a process the launcher started, `args.nproc` becomes the launcher's count of processes
    on this machine (what the command records).

    A refusal in the started processes would end in the launcher's own error report, so the
    checks that need no process group (`--nproc` itself, a model `--strategy` cannot shard)
    run here, in one line and before anything starts.

    Raises:
        ConfigError, ModelError: The refusal.
    """
    from amptrain import distributed
    from amptrain.errors import ConfigError
    from amptrain.run_setup import check_before_launch

    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} is invalid: it must be an integer >= 1")
    if distributed.launched_by_torchrun():  # a started process: the launcher's own count
        args.nproc = int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc))
        return False
    if args.nproc == 1:
        return False
    distributed.check_processes(args.nproc, cfg.device)
    distributed.collective_timeout()  # a bad AMPTRAIN_COLLECTIVE_TIMEOUT, before any process
    check_before_launch(cfg)
    return True


def relaunch(args: argparse.Namespace) -> int:
    """`--nproc N`: run the same command in N processes through torch's elastic launcher.

    `amptrain.launcher` runs it: the workers' exit codes and one-line messages, not the agent's
    own report.

    `--standalone` keeps the rendezvous on localhost with a free port. Every command that
    takes `--nproc` starts its processes here. `--nproc` itself is left out of their command
    line (the launcher would take it for its own `--nproc-per-node`); `check_launch` gives it
    back to them from the launcher's LOCAL_WORLD_SIZE.
    """
    argv, skip = [], False
    for token in args.argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            argv.append(token)
    launcher = [sys.executable, "-m", "amptrain.launcher", "--standalone",
                f"--nproc-per-node={args.nproc}", "-m", "amptrain", *argv]  # fmt: skip
    from amptrain.interrupts import run_child

    return run_child(launcher)  # signals reach every worker; none outlives this process


# The libraries amptrain drives and their own switches for quiet; `-v` leaves them as they are.
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "WANDB_SILENT": "true",
}  # fmt: skip
QUIET_LOGGERS = ("mlflow", "alembic", "transformers", "huggingface_hub", "datasets", "wandb",
                 "peft", "bitsandbytes", "urllib3")  # fmt: skip


@contextlib.contextmanager
def quiet_libraries(verbose: bool) -> Iterator[None]:
    """Silence MLflow's, transformers' and W&B's own messages and warnings unless `verbose`.

    Errors still show. The environment switches (which a library reads when it is imported,
    and which `--nproc` workers inherit) are set only where the user has not set them, and
    everything is put back when the command ends.
    """
    if verbose:
        yield
        return
    saved_env = {name: os.environ.get(name) for name in QUIET_ENV}
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for name in (*QUIET_LOGGERS, "sqlalchemy", "pydantic"):
                warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def progress_sinks(args: argparse.Namespace, total: int, what: str) -> list:
    """A live progress bar over `total` steps, unless `--no-progress`."""
    if getattr(args, "no_progress", False):
        return []
    from amptrain.metrics.console import ProgressSink

    return [ProgressSink(total, what)]


def print_ending(tables: Iterable[Any], label: str, path: Path | str) -> None:
    """Every command ends alike: its tables (or lines) on stdout, then where its files are."""
    from amptrain.metrics.console import Console

    console = Console()
    for table in tables:
        if isinstance(table, str):
            console.print(table, soft_wrap=True, highlight=False)
        else:
            console.print(table)
    console.print(f"{label}: {path}", soft_wrap=True, highlight=False)
