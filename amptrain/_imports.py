"""One registry of optional dependencies and one helper that explains how to install them.

`find_spec` imports nothing, so `import amptrain` stays light: optuna, wandb, lightning,
transformers, matplotlib, pandas, tensorboard, mlflow, pyarrow and datasets are imported only
where they are used.
"""

from __future__ import annotations

from importlib.util import find_spec


def _available(name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


MATPLOTLIB_AVAILABLE = _available("matplotlib")
OPTUNA_AVAILABLE = _available("optuna")
WANDB_AVAILABLE = _available("wandb")
LIGHTNING_AVAILABLE = _available("lightning") or _available("pytorch_lightning")
TRANSFORMERS_AVAILABLE = _available("transformers")
PANDAS_AVAILABLE = _available("pandas")
TENSORBOARD_AVAILABLE = _available("tensorboard")
MLFLOW_AVAILABLE = _available("mlflow")  # mlflow-skinny installs the same package
PYARROW_AVAILABLE = _available("pyarrow")
DATASETS_AVAILABLE = _available("datasets")
PEFT_AVAILABLE = _available("peft")
BITSANDBYTES_AVAILABLE = _available("bitsandbytes")
OPTIMI_AVAILABLE = _available("optimi")  # torch-optimi

_FLAGS = {
    "matplotlib": "MATPLOTLIB_AVAILABLE",
    "optuna": "OPTUNA_AVAILABLE",
    "wandb": "WANDB_AVAILABLE",
    "lightning": "LIGHTNING_AVAILABLE",
    "transformers": "TRANSFORMERS_AVAILABLE",
    "pandas": "PANDAS_AVAILABLE",
    "tensorboard": "TENSORBOARD_AVAILABLE",
    "mlflow": "MLFLOW_AVAILABLE",
    "pyarrow": "PYARROW_AVAILABLE",
    "datasets": "DATASETS_AVAILABLE",
    "peft": "PEFT_AVAILABLE",
    "bitsandbytes": "BITSANDBYTES_AVAILABLE",
    "optimi": "OPTIMI_AVAILABLE",
}


def requires(package: str, extra: str, feature: str, instead: str | None = None) -> None:
    """Raise a helpful `ModuleNotFoundError` when an optional package is missing.

    Args:
        package: The import name, one of the registry's keys.
        extra: The amptrain extra that installs it.
        feature: What the user asked for, in words.
        instead: An alternative that works without the package, if there is one.

    Raises:
        ModuleNotFoundError: If the package is not installed.
    """
    if globals()[_FLAGS[package]]:
        return
    message = f"{package} is required for {feature}; install with: pip install 'amptrain[{extra}]'"
    if instead:
        message += f" (or {instead})"
    raise ModuleNotFoundError(message, name=package)
