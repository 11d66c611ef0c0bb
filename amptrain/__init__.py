"""amptrain: train your own PyTorch transformer with mixed precision, and know what it does to it.

`import amptrain` needs torch and the standard library only; the optional extras (matplotlib,
optuna, wandb, lightning, transformers) are imported where they are used.
"""

from __future__ import annotations

from amptrain.callbacks import Callback
from amptrain.config import FitOptions, TrainConfig
from amptrain.data import Blocks
from amptrain.errors import (
    AmptrainError,
    ConfigError,
    DataError,
    ModelError,
    NonFiniteError,
    PrecisionError,
)
from amptrain.loop import FitResult, TrainState, evaluate, fit
from amptrain.precision import Precision, resolve

__version__ = "0.1.0"

__all__ = [
    "AmptrainError",
    "Blocks",
    "Callback",
    "ConfigError",
    "DataError",
    "FitOptions",
    "FitResult",
    "ModelError",
    "NonFiniteError",
    "Precision",
    "PrecisionError",
    "TrainConfig",
    "TrainState",
    "evaluate",
    "fit",
    "resolve",
]
