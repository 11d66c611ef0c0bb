"""Where a search from a config lives: its study name, run directory, storage and space."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amptrain.config import TrainConfig
from amptrain.errors import ConfigError
from amptrain.search import space as search_space


def open_run(
    cfg: TrainConfig, study_name: str | None, storage: str | None
) -> tuple[str, Path, str]:
    """The study name, its run directory `out/search-NAME` (not created here) and storage URL.

    Without a storage the study lives in a journal file inside its run directory, so a search
    resumes by naming the study again.
    """
    name, run_dir = _study_dir(study_name, Path(cfg.out))
    return name, run_dir, _storage_arg(storage) or str(run_dir / "journal.log")


def command_space(cfg: TrainConfig, space: Any, given: Mapping[str, Any]) -> Any:
    """The space to search: `space` if given, else the default less the flags given as fixed."""
    fixed = [n for n in search_space.PARAMS if n in given]
    if space is None and fixed:  # train flags given on the command line are not searched
        space = {k: v for k, v in _default_space(cfg).items() if k not in fixed}
    return space


def _default_space(cfg: TrainConfig) -> dict[str, Any]:
    from amptrain.precision import default_precisions
    from amptrain.run_setup import pick_device

    return search_space.default_space(default_precisions(pick_device(cfg.device)))


def _study_dir(name: str | None, out: Path) -> tuple[str, Path]:
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ConfigError(f"--study-name {name!r}: use letters, digits, '.', '_' or '-'")
        return name, out / f"search-{name}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        name = stamp + (f"-{n}" if n else "")
        if not (out / f"search-{name}").exists():
            return name, out / f"search-{name}"
    raise FileExistsError(f"could not find a free search directory name under {out}")


def _storage_arg(value: str | None) -> str | None:
    """`--storage`; `env:VAR` reads the URL from $VAR, keeping the password off the command line."""
    if value is None or not value.startswith("env:"):
        return value
    url = os.environ.get(value[4:])
    if not url:
        raise ConfigError(f"--storage {value}: the environment variable {value[4:]} is not set")
    return url
