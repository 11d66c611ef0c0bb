"""A run's trackers (the W&B, TensorBoard and MLflow sinks), from start to failure report.

They are started before training and told the run's settings, and their failures are
collected for the run's summary.

A tracker that was asked for is honoured or refused before the first training step: the
caller's `start(run_dir)` builds the sinks (with `required=True` they raise `TrackerError`
when their tool cannot start) once the run directory exists, and a refused start removes a
run directory that was just created, so nothing is left of a run that never trained.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from amptrain.metrics.sinks import Sink

Start = Callable[[Path], Iterable[Sink]]
"""Builds and starts the trackers' sinks for a run directory."""


def start(trackers: Start | None, run_dir: Path, created: bool) -> list[Sink]:
    """The sinks `trackers(run_dir)` starts; if it raises, a `created` run directory goes."""
    if trackers is None:
        return []
    try:
        return list(trackers(run_dir))
    except BaseException:
        if created:  # nothing trained: leave nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def tell_config(sinks: Iterable[Any], values: Mapping[str, Any]) -> None:
    """Give `values` to every sink that keeps a run config (W&B, TensorBoard, MLflow)."""
    for sink in sinks:
        if hasattr(sink, "log_config"):
            sink.log_config(values)


def failures(sinks: Iterable[Any]) -> list[dict[str, Any]]:
    """The failure records of the trackers that failed during the run (sink, when, error)."""
    return [sink.failure for sink in sinks if getattr(sink, "failure", None)]
