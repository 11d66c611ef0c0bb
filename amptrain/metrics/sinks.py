"""Metric sinks: one small protocol, `log(metrics, step)` and `close()`, and the built-in sinks.

Every sink receives the same slash-namespaced names (`train/loss`, `val/loss`, `amp/loss_scale`,
...) at the global optimizer step. File sinks write as they go, so an interrupted run keeps its
metrics up to the last logged step.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

Value = float | int | str

# Every metric the loop can write; the CSV header lists them all so the file can stream.
METRIC_NAMES = (
    "step", "train/loss", "train/lr", "train/grad_norm", "amp/loss_scale", "amp/skipped_steps",
    "perf/tokens_per_s", "perf/step_time_s", "mem/peak_mb", "mem/source",
    "val/loss", "val/perplexity", "val/accuracy",
)  # fmt: skip


@runtime_checkable
class Sink(Protocol):
    """Where metrics go."""

    def log(self, metrics: Mapping[str, Value], step: int) -> None:
        """Record `metrics` at optimizer step `step`."""

    def close(self) -> None:
        """Flush and release resources."""


class MemorySink:
    """Keeps every record in a list; for tests and for summaries."""

    def __init__(self) -> None:
        self.records: list[dict[str, Value]] = []

    def log(self, metrics: Mapping[str, Value], step: int) -> None:
        """Append `{"step": step, **metrics}`."""
        self.records.append({"step": step, **metrics})

    def close(self) -> None:
        """Nothing to release."""


def _json_value(value: Value) -> Value | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class JsonlSink:
    """One JSON object per line (non-finite numbers become null), flushed per record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] = open(_append_fd(self.path), "a", encoding="utf-8")  # noqa: SIM115

    def log(self, metrics: Mapping[str, Value], step: int) -> None:
        """Append one line."""
        record = {"step": step, **{k: _json_value(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class CsvSink:
    """A CSV with one column per metric in `METRIC_NAMES` (plus any extra names seen first)."""

    def __init__(self, path: str | Path, fieldnames: tuple[str, ...] = METRIC_NAMES) -> None:
        self.path = Path(path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        fd = _append_fd(self.path)  # open for the sink's life, closed by close()
        self._file: IO[str] = open(fd, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self._writer = csv.DictWriter(self._file, fieldnames=fieldnames, extrasaction="ignore")
        if new:
            self._writer.writeheader()

    def log(self, metrics: Mapping[str, Value], step: int) -> None:
        """Append one row; metrics not in the header are left out."""
        self._writer.writerow({"step": step, **metrics})
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _append_fd(path: Path) -> int:
    """A descriptor appending to `path`, created 644 whatever a loose umask would allow."""
    return os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o644)
