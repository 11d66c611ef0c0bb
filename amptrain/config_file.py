"""`--config` files: read one, and refuse a malformed one in one line naming the file and key.

A config file is a JSON object of `TrainConfig` fields, such as a previous run's
`config.json`. Each file is checked on its own before the command line's flags are merged in,
so every error can name the file it came from; the built-in model's size is estimated here too,
so an absurd width is refused before anything is allocated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amptrain.config import TrainConfig, run_values
from amptrain.errors import ConfigError


def read_json_object(path: Path) -> dict[str, Any]:
    """A `--config` file's JSON object, as written.

    Raises:
        ConfigError: One line naming the file: unreadable, not JSON, or not an object.
    """
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid JSON at line {exc.lineno}, column "
                          f"{exc.colno}: {exc.msg}") from None  # fmt: skip
    except RecursionError:
        raise ConfigError(
            f"--config {path}: its JSON is nested deeper than Python reads; a config is an "
            "object of settings a level or two deep"
        ) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings such as "
                          f'{{"fit": {{"lr": 0.001}}}}, got {_json_kind(loaded)}')  # fmt: skip
    return loaded


def load_config_file(path: Path) -> dict[str, Any]:
    """The settings of a `--config` file, checked on their own so that errors name the file.

    Raises:
        ConfigError: One line naming the file, the key and what was expected.
    """
    loaded = run_values(read_json_object(path))  # a run's config also has command, environment
    if not isinstance(loaded.get("fit", {}), dict):
        raise ConfigError(f"--config {path}: key 'fit' must be a JSON object of loop "
                          f"settings such as {{\"lr\": 0.001}}, got "
                          f"{_json_kind(loaded['fit'])}")  # fmt: skip
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
