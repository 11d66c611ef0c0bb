"""The run's metric history in memory: summary tables and the best evaluation."""

from __future__ import annotations

from typing import Any

from amptrain._imports import PANDAS_AVAILABLE
from amptrain.metrics.sinks import MemorySink


class Tracker(MemorySink):
    """A sink that keeps every record and answers questions about them."""

    def evaluations(self) -> list[dict[str, Any]]:
        """The records that carry validation metrics, in step order."""
        return [r for r in self.records if "val/loss" in r]

    def best(self, metric: str = "val/loss", mode: str = "min") -> dict[str, Any] | None:
        """The evaluation record with the best `metric` (None before any evaluation)."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} must be 'min' or 'max'")
        rows = [r for r in self.records if isinstance(r.get(metric), (int, float))]
        if not rows:
            return None
        pick = min if mode == "min" else max
        return pick(rows, key=lambda r: r[metric])

    def table(self, which: str = "evaluations") -> Any:
        """`evaluations` or `steps` as a pandas DataFrame when pandas is installed, else records."""
        if which not in ("evaluations", "steps"):
            raise ValueError(f"which={which!r} must be 'evaluations' or 'steps'")
        rows = (
            self.evaluations()
            if which == "evaluations"
            else [r for r in self.records if "train/loss" in r]
        )
        if not PANDAS_AVAILABLE:
            return rows
        import pandas as pd

        return pd.DataFrame(rows)
