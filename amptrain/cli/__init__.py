"""The `amptrain` command: argparse subcommands, one module each in this package.

Each command module (`train`, `bench`, `doctor`, `compare`, `search`, `eval`, `generate`,
`demo`) adds its parser
and handles its arguments; it imports its workflow inside the handler, so `amptrain --help`
answers fast, imports no workflow and needs no extra. Nothing in amptrain imports this package.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from amptrain.cli import bench, compare, demo, doctor, generate, search, train
from amptrain.cli import eval as eval_command
from amptrain.cli.common import quiet_libraries, read_config
from amptrain.errors import AmptrainError, EnvironmentFailure, Interrupted, Stopped

COMMANDS = (train, bench, doctor, compare, search, eval_command, generate, demo)


def build_parser(defaults: dict[str, dict] | None = None) -> argparse.ArgumentParser:
    """The argument parser of `amptrain`; `defaults` maps a command to its option defaults."""
    parser = argparse.ArgumentParser(
        prog="amptrain", description="Train your own transformer with mixed precision."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        parser_of = command.register(sub)
        name = command.__name__.rsplit(".", 1)[-1]
        if defaults and name in defaults:
            parser_of.set_defaults(**{k: v for k, v in defaults[name].items() if k != "study"})
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse in two passes: a `--config` file's section for this command sets its defaults.

    A run's `config.json` keeps the command's own options under the command's name (for
    example `"bench": {"steps": 30}`), so `amptrain bench --config runs/bench-X/config.json`
    reruns that benchmark; flags given on the command line still win.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    section = read_config(path).get(args.command) if path is not None else None
    if isinstance(section, dict) and section:
        known = set(getattr(args, "settings", ()))
        unknown = sorted(set(section) - known - {"study"})
        if unknown:
            raise AmptrainError(f"--config {path}: {args.command} has no options {unknown}; "
                                f"known: {sorted(known)}")  # fmt: skip
        parser = build_parser(defaults={args.command: section})
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code, one meaning each (`amptrain.errors.EXIT_CODES`).

    A torchrun worker ends here once its command returned (`distributed.end_worker`).
    """
    code = _run(argv)
    distributed = sys.modules.get("amptrain.distributed")  # not imported: no process group
    return code if distributed is None else distributed.end_worker(code)


def _run(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # --help and usage errors end here
    args.argv = argv
    _setup_logging(args.verbose)
    try:
        args = parse(argv)
        args.argv = argv
        with quiet_libraries(args.verbose), _trusting(getattr(args, "trust_model_code", False)):
            return args.func(args)
    except (Interrupted, Stopped) as exc:
        out = getattr(args, "out", None) or "runs"
        hint = f"; resume with: amptrain train --resume auto --out {out}" if exc.checkpoint else ""
        _say(f"amptrain: {exc}{hint}")
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        _say("amptrain: aborted by Ctrl-C; complete checkpoints are kept, partial ones removed")
        return 130
    except BaseException as exc:  # noqa: BLE001 - sorted below; anything else is a bug
        exc = _peer_lost(exc) or exc
        code = exit_code(exc)
        if code is None:
            raise
        _say(f"amptrain: {_LABELS[code]}: {_first_line(exc)}{_advice(exc)}", _own_failure(exc))
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


@contextlib.contextmanager
def _trusting(trusted: bool) -> Iterator[None]:
    """`--trust-model-code`: for this command, what a run directory names may be imported."""
    if not trusted:
        yield
        return
    from amptrain.models import trust

    trust.permit()
    try:
        yield
    finally:
        trust.permit(False)


def _first_line(exc: BaseException) -> str:
    """The message; torch's out-of-memory error runs on for lines about its allocator."""
    text = str(exc)
    return text.splitlines()[0] if type(exc).__name__ == "OutOfMemoryError" and text else text


def _advice(exc: BaseException) -> str:
    if type(exc).__name__ != "OutOfMemoryError":
        return ""
    return (
        "; lower --batch-size (or --batches for the doctor), or --context, or train on a "
        "GPU with more memory"
    )


def _say(line: str, own: bool = False) -> None:
    """Print `line` on rank 0; on another rank only a failure of its `own`, with its rank."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(line, file=sys.stderr)
    elif own:
        print(line.replace("amptrain:", f"amptrain (rank {rank}):", 1), file=sys.stderr)


def _peer_lost(exc: BaseException) -> BaseException | None:
    """A collective that timed out or lost a peer (under --nproc), as one line."""
    distributed = sys.modules.get("amptrain.distributed")  # not imported: no process group
    return None if distributed is None else distributed.peer_lost(exc)


def _own_failure(exc: BaseException) -> bool:
    """A failure one rank may meet alone (its disk, its memory), unless rank 0 says it too.

    Refusals of the input and the non-finite stop are decided alike on every rank: rank 0
    alone says them.
    """
    return isinstance(exc, (EnvironmentFailure, OSError, MemoryError)) and not getattr(
        exc, "said_by_rank_0", False
    )


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from amptrain.metrics.console import stderr_console

    logger = logging.getLogger("amptrain")
    logger.handlers[:] = [RichHandler(console=stderr_console(), show_path=False, show_time=False)]
    level = logging.DEBUG if verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:
        level = logging.WARNING  # the other ranks speak only when something is wrong
    logger.setLevel(level)
    logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
