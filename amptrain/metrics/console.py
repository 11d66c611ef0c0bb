"""The console: a live progress bar with the step figures, and the end-of-run summary table.

This is the only place that draws on the terminal; the library otherwise logs through
`logging.getLogger("amptrain")`.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from amptrain.metrics.sinks import Value


@functools.cache
def stderr_console() -> Console:
    """The one console for progress and log lines, so the live bar and messages do not clash."""
    return Console(stderr=True)


class ProgressSink:
    """Training progress: a live bar on a terminal, else one line per logged step.

    The bar keeps what matters at any width: the step count, tokens/s and the time left,
    then the loss, the learning rate, and the loss scale and skipped steps (those two only
    once a GradScaler is at work). Where the console is not a terminal (a log file, CI) a
    bar cannot be redrawn, so every step the loop logs (`--log-every`) becomes a line.
    """

    def __init__(self, total_steps: int, description: str, console: Console | None = None) -> None:
        self.console = console or stderr_console()
        self.total, self.description = total_steps, description
        self.live = self.console.is_terminal or self.console.is_jupyter
        self._first: tuple[float, int] | None = None  # (time, step) of the first training log
        if not self.live:
            return
        self._bar = 10 if self.console.width < 100 else 20 if self.console.width < 140 else 40
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=self._bar),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total_steps, figures="")
        self._progress.start()

    def log_config(self, values: Mapping[str, Any]) -> None:
        """The run's resolved settings: `--epochs` has set the steps the bar counts to."""
        steps = values.get("fit", {}).get("max_steps")
        if isinstance(steps, int) and steps != self.total:
            self.total = steps
            if self.live:
                self._progress.update(self._task, total=steps)

    def log(self, metrics: Mapping[str, Value], step: int) -> None:
        """Advance the bar to `step` (or print its line), or print a line for an evaluation."""
        if "val/loss" in metrics:
            self.console.print(
                f"step {step}: val/loss {metrics['val/loss']:.4f}  "
                f"val/accuracy {metrics['val/accuracy']:.3f}",
                highlight=False,
            )
            return
        if self._first is None:
            self._first = (time.monotonic(), step)
        if self.live:
            # Columns besides the figures: description, bar, "N/N", the time left, the gaps.
            used = len(self.description) + self._bar + 2 * len(str(self.total)) + 1 + 7 + 4
            figures = fit_figures(metrics, self.console.width - used - 1)
            self._progress.update(self._task, completed=step, figures=figures)
            return
        figures = fit_figures(metrics, 1_000)
        self.console.print(f"{self.description} step {step}/{self.total}  {figures}  "
                           f"ETA {self._eta(step)}", highlight=False, soft_wrap=True)  # fmt: skip

    def _eta(self, step: int) -> str:
        start, first = self._first
        if step <= first:
            return "-:--:--"
        left = (self.total - step) * (time.monotonic() - start) / (step - first)
        return str(dt.timedelta(seconds=round(left)))

    def close(self) -> None:
        """Stop the live display."""
        if self.live:
            self._progress.stop()


def fit_figures(metrics: Mapping[str, Value], room: int) -> str:
    """The step's figures in at most `room` characters, the least useful dropped first.

    Tokens/s always stays; then the loss, skipped steps (when there were any), the learning
    rate, and the loss scale (when a GradScaler is at work).
    """
    scale, skipped = metrics.get("amp/loss_scale", 1), metrics.get("amp/skipped_steps", 0)
    parts = {  # in the order shown; the number is the rank in which parts are kept
        "loss": (1, f"loss {metrics['train/loss']:.4f}"),
        "tok/s": (0, f"{metrics['perf/tokens_per_s']:,.0f} tok/s"),
        "lr": (3, f"lr {metrics['train/lr']:.2e}"),
    }
    if scale != 1 or skipped:
        parts["scale"] = (4, f"scale {scale:g}")
    if skipped:
        parts["skipped"] = (2, f"skipped {skipped}")
    kept: set[str] = set()
    for name in sorted(parts, key=lambda n: parts[n][0]):
        shown = "  ".join(parts[n][1] for n in parts if n in kept | {name})
        if kept and len(shown) > room:
            break
        kept.add(name)
    return "  ".join(parts[n][1] for n in parts if n in kept)


def summary_table(title: str, rows: Mapping[str, object]) -> Table:
    """A two-column table of name and value."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold", overflow="fold")
    table.add_column(overflow="fold")
    for name, value in rows.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(name, text)
    return table
