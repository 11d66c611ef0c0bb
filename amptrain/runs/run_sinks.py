"""Sinks a training run keeps on its own directory: the fast-path record and the watch.

`FastPathRecord` writes the kernels `fit` decided on into config.json as soon as they are
known, so a run stopped or failed before its end still says which it ran with. `RunDirectoryWatch`
stops the run in one line (exit 3) when its directory is removed or replaced while it trains:
the metrics would go to files no one can see and every later write would fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from amptrain.errors import EnvironmentFailure
from amptrain.runs import atomic_write_json


def record_fast_path(path: Path, fast_path: dict[str, Any]) -> None:
    """Add the kernels the run used (decided inside `fit`) to its config.json's environment."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config.setdefault("environment", {})["fast_path"] = fast_path
    atomic_write_json(path, config)


class FastPathRecord:
    """A sink that writes the fast path into config.json as soon as `fit` has decided it.

    The end of the run writes the record again, with what training added (recompiles, the
    allocator).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def log_config(self, values: dict[str, Any]) -> None:
        """Write the fast path when `fit` tells the sinks its options."""
        if "fast_path" in values:
            record_fast_path(self.path, values["fast_path"])

    def log(self, metrics: Any, step: int) -> None:
        """Metrics are the other sinks' business."""

    def close(self) -> None:
        """Nothing held open."""


class RunDirectoryWatch:
    """A sink that checks, at every logged step, that the run directory is still the same one.

    Raises:
        EnvironmentFailure: From `log`, when the directory is gone or another one stands in
            its place (a different inode).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._identity = _identity(run_dir)

    def log(self, metrics: Any, step: int) -> None:
        """Stop the run if its directory was removed or replaced."""
        if _identity(self.run_dir) != self._identity:
            raise EnvironmentFailure(
                f"the run directory {self.run_dir} was removed while the run trained (seen at "
                f"step {step}); the run stopped, since nothing more could be kept"
            )

    def close(self) -> None:
        """Nothing held open."""


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino
