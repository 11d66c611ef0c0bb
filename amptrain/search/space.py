"""The search space of `amptrain search`: which training settings are sampled, and how.

A space maps the names of `train` flags (`lr`, `batch_size` or `batch-size`, `grad_accum`,
`warmup`, `weight_decay`, `clip_norm`, `precision`, the LoRA settings, and the memory levers
`compensation` and `optimizer_state`) to one of:

- a list: the choices, e.g. `"batch_size": [8, 16, 32]` or `"precision": ["bf16",
  "bf16-true"]` (bf16 weights are a precision choice, as on the command line);
- a table `{"low": a, "high": b, "log": false, "step": null}`: a range of numbers (whole
  numbers for `grad_accum`);
- a single value: fixed for every trial.

It comes from a JSON or TOML file or a dict in Python and is checked in full, value by value,
against the same rules as `amptrain train`, before any trial runs. A sampled trial becomes a
copy of the `TrainConfig` with the sampled values put in (`apply`), and `train_command` writes
the `amptrain train` command line that runs exactly that configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amptrain import settings_file
from amptrain.config import TrainConfig
from amptrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

# Space name -> TrainConfig field ("fit." marks FitOptions fields).
PARAMS = {
    "lr": "fit.lr",
    "batch_size": "fit.batch_size",
    "grad_accum": "fit.grad_accum",
    "warmup": "fit.warmup",
    "weight_decay": "fit.weight_decay",
    "clip_norm": "fit.clip_norm",
    "precision": "precision",
    "lora": "lora",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "compensation": "fit.compensation",
    "optimizer_state": "fit.optimizer_state",
}
_INTS = ("batch_size", "grad_accum", "lora")
# Batch sizes are choices, not ranges: every trial then scores the same validation blocks
# (see search._eval_blocks), and `amptrain train` with the best batch size scores them too.
_CHOICES_ONLY = ("batch_size", "precision", "compensation", "optimizer_state")
_RANGE_KEYS = ("low", "high", "log", "step")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One entry of a space: choices, a range, or a fixed value."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    fixed: Any = None

    @property
    def searched(self) -> bool:
        """False for a fixed value."""
        return self.choices is not None or self.low is not None

    def contains(self, value: Any) -> bool:
        """Whether `value` is one of the choices or inside the range."""
        if self.choices is not None:
            return value in self.choices
        if self.low is None:
            return value == self.fixed
        return value is not None and self.low <= value <= self.high

    def values_to_check(self) -> list[Any]:
        """The values whose validity decides the dimension's: every choice, both bounds."""
        if self.choices is not None:
            return list(self.choices)
        return [self.low, self.high] if self.low is not None else [self.fixed]


def default_space(precisions: Sequence[str]) -> dict[str, Any]:
    """The built-in space; `precisions` are those `precision.default_precisions` gives."""
    return {
        "lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "batch_size": [8, 16, 32],
        "warmup": {"low": 0.0, "high": 0.3},
        "weight_decay": {"low": 0.0, "high": 0.2},
        "grad_accum": [1, 2],
        "precision": list(precisions),
    }


def load_space(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Read a space from a JSON, YAML or TOML file (`settings_file`), or copy a mapping.

    Raises:
        ConfigError: For a missing or unreadable file, or one that is not a table.
    """
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}; give a {settings_file.FORMATS} "
                          "file")  # fmt: skip
    loaded = settings_file.read(path, f"search space {path}")
    if not isinstance(loaded, dict):
        raise ConfigError(f"search space {path} must be a table of name -> spec, not {loaded!r}")
    return loaded


def parse_space(
    space: Mapping[str, Any], base: TrainConfig, device: str | torch.device = "cpu"
) -> dict[str, Dimension]:
    """Check every entry of `space` and return its dimensions by canonical name.

    Each choice and bound is put into a copy of `base` so that `TrainConfig`'s own checks
    judge it, exactly as they would judge the `train` flag; precisions are resolved for
    `device`, so one the device cannot serve is refused before any trial runs.

    Raises:
        ConfigError: Naming the bad key or value, with the valid keys or the limit.
        PrecisionError: For a precision that is unknown or that `device` cannot serve.
    """
    if not space:
        raise ConfigError(f"the search space is empty; give at least one of {sorted(PARAMS)}")
    dims: dict[str, Dimension] = {}
    for key, spec in space.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in PARAMS:
            raise ConfigError(
                f"search space key {key!r} is not a searchable setting; valid keys: "
                f"{', '.join(sorted(PARAMS))}"
            )
        if name in dims:
            raise ConfigError(f"search space names {name!r} twice ({key!r})")
        dims[name] = _dimension(name, spec)
        for value in dims[name].values_to_check():
            try:
                trial = apply(base, {name: value})
            except ConfigError as exc:
                raise ConfigError(f"search space {name!r}: {exc}") from None
            if name in ("optimizer_state", "compensation"):  # its library, before any trial
                from amptrain.preflight import check_optimizer_state

                check_optimizer_state(trial.fit)
                if name == "compensation" and value != "sr":
                    from amptrain._imports import requires

                    requires("optimi", "memory", f"compensation {value}", "search sr only")
            if name == "precision":  # bf16-true is bf16 autocast with bf16 weights (TrainConfig)
                from amptrain.precision import resolve

                resolve(trial.precision, device)
    return dims


def _dimension(name: str, spec: Any) -> Dimension:
    if isinstance(spec, (list, tuple)):
        if not spec or len(set(map(repr, spec))) != len(spec):
            raise ConfigError(f"search space {name!r}: choices {spec!r} must be distinct, >= 1")
        return Dimension(name, choices=tuple(spec))
    if not isinstance(spec, Mapping):
        return Dimension(name, fixed=spec)
    if name in _CHOICES_ONLY:
        raise ConfigError(f"search space {name!r} takes a list of choices, e.g. [8, 16, 32]")
    unknown = sorted(set(spec) - set(_RANGE_KEYS))
    if unknown or "low" not in spec or "high" not in spec:
        raise ConfigError(
            f"search space {name!r}: a range needs 'low' and 'high' (optional 'log', 'step'); "
            f"got keys {sorted(spec)}"
        )
    low, high, log, step = (spec.get(k) for k in _RANGE_KEYS)
    kind = int if name in _INTS else (int, float)
    numbers = [v for v in (low, high, step) if v is not None]
    if any(isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v) for v in numbers):
        what = "whole numbers" if name in _INTS else "finite numbers"
        raise ConfigError(f"search space {name!r}: low/high/step must be {what}, got {dict(spec)}")
    if not low < high or (log and low <= 0) or (log and step) or (step is not None and step <= 0):
        raise ConfigError(
            f"search space {name!r}: need low < high, low > 0 with log, step > 0, and not both "
            f"log and step; got {dict(spec)}"
        )
    return Dimension(name, low=low, high=high, log=bool(log), step=step)


def sample(trial: Any, dims: Mapping[str, Dimension]) -> dict[str, Any]:
    """Ask the Optuna `trial` for a value of every dimension (fixed ones are returned as is)."""
    params = {}
    for name, dim in dims.items():
        if dim.choices is not None:
            params[name] = trial.suggest_categorical(name, list(dim.choices))
        elif dim.low is None:
            params[name] = dim.fixed
        elif name in _INTS:
            step = dim.step or 1
            params[name] = trial.suggest_int(name, dim.low, dim.high, step=step, log=dim.log)
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
    return params


def apply(cfg: TrainConfig, params: Mapping[str, Any]) -> TrainConfig:
    """A copy of `cfg` with `params` (space names) put into their `TrainConfig` fields.

    Raises:
        ConfigError: If a value is out of range for its field.
    """
    fit_values = {PARAMS[n][4:]: v for n, v in params.items() if PARAMS[n].startswith("fit.")}
    top = {PARAMS[n]: v for n, v in params.items() if not PARAMS[n].startswith("fit.")}
    if "precision" in top:  # a sampled precision says the weights too: TrainConfig turns
        fit_values.setdefault("weights", "fp32")  # bf16-true into bf16 with bf16 weights
    return dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, **fit_values), **top)


def batch_sizes(base: TrainConfig, dims: Mapping[str, Dimension]) -> list[int]:
    """Every batch size a trial may use."""
    dim = dims.get("batch_size")
    if dim is None:
        return [base.fit.batch_size]
    return list(dim.choices) if dim.choices is not None else [dim.fixed]


def eval_blocks(base: TrainConfig, sizes: Sequence[int], n_val: int) -> int:
    """The validation blocks every trial is scored on.

    A multiple of every batch size near `eval_batches x batch_size` of `base`, so that
    `amptrain train` with any of the sizes (and `eval_batches = blocks / size`) scores the same
    first blocks; or the whole validation set when that is smaller.
    """
    step = math.lcm(*sizes)
    return min(step * math.ceil(base.fit.eval_batches * base.fit.batch_size / step), n_val)


def budgeted(
    cfg: TrainConfig,
    steps: int | None,
    tokens: int | None,
    block_targets: int,
    blocks: int,
    reports: int,
) -> TrainConfig:
    """`cfg` with the trial budget as steps, `reports` evaluations, and `blocks` scored.

    A token budget becomes `tokens / (batch_size x grad_accum x block_targets)` steps, so every
    trial trains on about the same number of tokens whatever its batch size.
    """
    fit = cfg.fit
    if steps is None:
        steps = max(1, round(tokens / (fit.batch_size * fit.grad_accum * block_targets)))
    fit = dataclasses.replace(fit, max_steps=steps, eval_every=math.ceil(steps / reports),
                              eval_batches=math.ceil(blocks / fit.batch_size),
                              checkpoint_every=0)  # fmt: skip
    return dataclasses.replace(cfg, fit=fit)


def base_values(cfg: TrainConfig, names: Sequence[str]) -> dict[str, Any]:
    """The values `cfg` holds for the space names `names` (the default settings' trial)."""
    from amptrain.flags import value_of

    return {n: value_of(cfg, PARAMS[n]) for n in names}


# Always written, so the command does not depend on the defaults of a later amptrain.
_ALWAYS = ("--precision", "--max-steps", "--batch-size", "--grad-accum", "--lr", "--warmup",
           "--weight-decay", "--eval-every", "--eval-batches", "--seed")  # fmt: skip


def train_command(cfg: TrainConfig) -> str:
    """The `amptrain train` command line that trains exactly `cfg` (shell-quoted)."""
    from amptrain.flags import train_flags, value_of

    default = TrainConfig()
    parts = ["amptrain", "train"]
    for f in train_flags():
        flag, field, value = f.flag, f.field, value_of(cfg, f.field)
        if flag == "--out" or (value == value_of(default, field) and flag not in _ALWAYS):
            continue
        if field == "fit.clip_norm" and value is None:
            value = 0  # the flag's spelling of "no clipping"
        if field == "model_kwargs":
            value = json.dumps(value, sort_keys=True)
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)
