"""Callbacks: four no-op hooks, called by the loop at fixed points. Subclass and override."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class Callback:
    """Base class; every hook does nothing. `state` is the loop's `TrainState`."""

    def on_fit_start(self, state: Any) -> None:
        """Before the first step."""

    def on_step_end(self, state: Any, metrics: Mapping[str, Any]) -> None:
        """After each optimizer step (skipped or not); set `state.should_stop` to stop early."""

    def on_eval_end(self, state: Any, metrics: Mapping[str, Any]) -> None:
        """After each evaluation; set `state.should_stop` to stop early (e.g. pruning)."""

    def on_fit_end(self, state: Any) -> None:
        """After the last step and evaluation, also when training stops on an error."""


def emit(callbacks: Iterable[Callback], hook: str, *args: Any) -> None:
    """Call `hook` on every callback in order."""
    for callback in callbacks:
        getattr(callback, hook)(*args)
