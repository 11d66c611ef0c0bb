"""`--config` files: read one, and refuse a malformed one in one line naming the file and key.

A config file is an object of `TrainConfig` fields in JSON, YAML or TOML
(`amptrain.settings_file`), such as a previous run's `config.json`. The loop's settings sit
under `fit`, as `config.json` writes them, or at the top level (`lr: 3e-4` is `fit.lr`), as
hand-written configs of other tools put them; a key under the wrong one is refused naming where
it belongs. Each file is checked on its own before the command line's flags are merged in, so
every error can name the file it came from; the built-in model's size is estimated here too, so
an absurd width is refused before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from amptrain import settings_file
from amptrain.config import FitOptions, TrainConfig, run_values
from amptrain.errors import ConfigError


def read_config_object(path: Path) -> dict[str, Any]:
    """A `--config` file's object, as written (JSON, YAML or TOML, by its suffix).

    Raises:
        ConfigError: One line naming the file: unreadable, not valid, or not an object.
    """
    loaded = settings_file.read(path, f"--config {path}")
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings such as "
                          f'{{"fit": {{"lr": 0.001}}}}, got {_json_kind(loaded)}')  # fmt: skip
    return loaded


def placed(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """`values` with the loop's settings given at the top level moved under `fit`.

    A flag's spelling (`max-steps`) is taken for its field (`max_steps`).

    Raises:
        ConfigError: For a setting given both ways with different values, or a top-level
            setting written under `fit`; the message names the key and where it belongs.
    """
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    loop = {f.name for f in dataclasses.fields(FitOptions)}
    values = {(k.replace("-", "_") if k.replace("-", "_") in top | loop else k): v
              for k, v in values.items()}  # fmt: skip
    flat = {k: v for k, v in values.items() if k in loop and k not in top}
    if not flat:
        return values
    fit = values.get("fit", {})
    if not isinstance(fit, dict):
        return values  # refused as it is by load_config_file
    for key, value in flat.items():
        if key in fit and fit[key] != value:
            raise ConfigError(f"--config {path}: {key!r} is given at the top level ({value!r}) "
                              f"and under fit ({fit[key]!r}); keep one")  # fmt: skip
    kept = {k: v for k, v in values.items() if k not in flat}
    return {**kept, "fit": {**fit, **flat}}


def _misplaced(fit: dict[str, Any], path: Path) -> None:
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    wrong = sorted(set(fit) & top)
    if wrong:
        raise ConfigError(f"--config {path}: {wrong} belong at the top level, not under fit "
                          "(fit holds the training loop's settings)")  # fmt: skip


def load_config_file(path: Path) -> dict[str, Any]:
    """The settings of a `--config` file, checked on their own so that errors name the file.

    Raises:
        ConfigError: One line naming the file, the key and what was expected.
    """
    loaded = run_values(read_config_object(path))  # a run's config: command, environment too
    loaded = placed(loaded, path)
    if not isinstance(loaded.get("fit", {}), dict):
        raise ConfigError(f"--config {path}: key 'fit' must be a JSON object of loop "
                          f"settings such as {{\"lr\": 0.001}}, got "
                          f"{_json_kind(loaded['fit'])}")  # fmt: skip
    _misplaced(loaded.get("fit", {}), path)
    try:
        cfg = TrainConfig.from_dict(loaded)
        if cfg.model == "tiny-gpt":
            from amptrain.run_setup import check_model_size, pick_device  # torch: imported late

            check_model_size(cfg, vocab_size=256, device=pick_device(cfg.device))
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    return loaded


def _json_kind(value: object) -> str:
    kinds = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number") + f" ({json.dumps(value)[:40]})"
