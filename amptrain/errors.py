"""The exceptions amptrain raises for problems a user can fix.

They subclass the built-in type a caller would expect (`ValueError` for bad input,
`RuntimeError` for a run that cannot go on), so `except ValueError` keeps working, and the CLI
turns them into one clear line and a non-zero exit instead of a traceback.
"""

from __future__ import annotations


class AmptrainError(Exception):
    """Base class of amptrain's user-facing errors."""


class ConfigError(AmptrainError, ValueError):
    """A setting is out of range or inconsistent; raised before any work starts."""


class DataError(AmptrainError, ValueError):
    """The training data cannot be used as given (empty, too short, ids out of range...)."""


class ModelError(AmptrainError, TypeError):
    """The model cannot be loaded or its output cannot be used as logits."""


class PrecisionError(AmptrainError, ValueError):
    """A precision name is unknown, or the hardware cannot serve the request."""


class NonFiniteError(AmptrainError, RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""


class Interrupted(AmptrainError):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: object) -> None:
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint directory"
        super().__init__(f"stopped by {name} after step {step}; {where}")
