"""The exceptions amptrain raises for problems a user can fix.

They subclass the built-in type a caller would expect (`ValueError` for bad input,
`RuntimeError` for a run that cannot go on), so `except ValueError` keeps working, and the CLI
turns them into one clear line and a non-zero exit instead of a traceback. Each class
carries the exit code the CLI returns for it (see `EXIT_CODES`).
"""

from __future__ import annotations

import re
from pathlib import Path

# The exit codes of the `amptrain` command, one meaning each (the README's table).
EXIT_CODES = {
    0: "done",
    1: "the run failed, or the non-finite policy stopped it",
    2: "the input was refused before any work",
    3: "the environment failed (disk full, read-only or unwritable folder, out of memory)",
    130: "interrupted by SIGINT (Ctrl-C) after checkpointing; resumable",
    143: "interrupted by SIGTERM after checkpointing; resumable",
}


class AmptrainError(Exception):
    """Base class of amptrain's user-facing errors."""

    exit_code = 2
    """What the CLI exits with: by default the input was refused before any work."""


class ConfigError(AmptrainError, ValueError):
    """A setting is out of range or inconsistent; raised before any work starts."""


class DataError(AmptrainError, ValueError):
    """The training data cannot be used as given (empty, too short, ids out of range...)."""


class ModelError(AmptrainError, TypeError):
    """The model cannot be loaded or its output cannot be used as logits."""


class PrecisionError(AmptrainError, ValueError):
    """A precision name is unknown, or the hardware cannot serve the request."""


class TrackerError(AmptrainError, RuntimeError):
    """A tracker that was asked for (W&B, TensorBoard, MLflow) cannot start; nothing trained."""


class NonFiniteError(AmptrainError, RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""

    exit_code = 1


class EnvironmentFailure(AmptrainError, OSError):
    """The machine failed the run: a write failed (disk full, permissions), memory ran out."""

    exit_code = 3


class Interrupted(AmptrainError):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: object) -> None:
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint directory"
        super().__init__(f"stopped by {name} after step {step}; {where}")


class Stopped(AmptrainError):
    """A command other than training stopped on SIGINT or SIGTERM; `kept` says what remains."""

    checkpoint = None

    def __init__(self, signum: int, kept: str) -> None:
        import signal

        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; {kept}")


def weights_only_refusal(path: str | Path, exc: BaseException) -> str:
    """Why a weights-only load refused `path`, in our words.

    PyTorch's own message suggests loading again with `weights_only=False`, which would run
    whatever code the file carries; only the name of the refused object is passed on.
    """
    found = re.search(r"Unsupported global: GLOBAL (\S+)|unsupported (?:class|global) (\S+)",
                      str(exc), flags=re.IGNORECASE)  # fmt: skip
    what = f" ({next(g for g in found.groups() if g)})" if found else ""
    return (
        f"refusing to load {path}: it holds an object other than tensors and plain containers"
        f"{what}, which could run code when loaded; amptrain loads only with weights_only=True. "
        "Re-create the file from a source you trust"
    )
