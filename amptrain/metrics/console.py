"""The console: a live progress bar with the step figures, and the end-of-run summary table.

This is the only place that draws on the terminal; the library otherwise logs through
`logging.getLogger("amptrain")`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from amptrain.metrics.sinks import Value


@functools.cache
def stderr_console() -> Console:
    """The one console for progress and log lines, so the live bar and messages do not clash."""
    return Console(stderr=True)


class ProgressSink:
    """A rich progress bar over optimizer steps showing loss, lr, tokens/s and the loss scale."""

    def __init__(self, total_steps: int, description: str, console: Console | None = None) -> None:
        self.console = console or stderr_console()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total_steps, figures="")
        self._progress.start()

    def log(self, metrics: Mapping[str, Value], step: int) -> None:
        """Advance the bar to `step`, or print a line for an evaluation."""
        if "val/loss" in metrics:
            self._progress.console.print(
                f"step {step}: val/loss {metrics['val/loss']:.4f}  "
                f"val/accuracy {metrics['val/accuracy']:.3f}"
            )
            return
        figures = (
            f"loss {metrics['train/loss']:.4f}  lr {metrics['train/lr']:.2e}  "
            f"{metrics['perf/tokens_per_s']:,.0f} tok/s (recent steps)  "
            f"scale {metrics['amp/loss_scale']:g}  "
            f"skipped {metrics['amp/skipped_steps']}"
        )
        self._progress.update(self._task, completed=step, figures=figures)

    def close(self) -> None:
        """Stop the live display."""
        self._progress.stop()


def summary_table(title: str, rows: Mapping[str, object]) -> Table:
    """A two-column table of name and value."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold", overflow="fold")
    table.add_column(overflow="fold")
    for name, value in rows.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(name, text)
    return table
