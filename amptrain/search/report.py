"""Show and save a search: progress bar, console table, trials.csv, best.json, config.json, plots.

This is the presentation side of `amptrain.search`, as `amptrain.bench.report` is of the
bench. The plots (optimisation history, parameter
importances, parallel coordinates) are Optuna's matplotlib ones, drawn with the `plot` extra;
importances are skipped, with a log line, while too few trials are complete.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from amptrain._imports import MATPLOTLIB_AVAILABLE
from amptrain.runs import atomic_write_bytes, atomic_write_json, make_dirs
from amptrain.search.records import SearchResult

log = logging.getLogger("amptrain")

_METRICS = ("precision", "steps", "tokens", "tokens_per_s", "final_val_accuracy",
            "final_train_loss", "skipped_steps", "loss_scale", "train_time_s")  # fmt: skip


class SearchProgress:
    """A progress bar over trials, with the best value so far; a no-op when not enabled."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self._progress = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from amptrain.metrics.console import stderr_console

        self._progress = Progress(
            TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[best]}"), TimeElapsedColumn(), console=stderr_console(),
        )  # fmt: skip
        self._task = self._progress.add_task("search", total=total, best="")
        self._progress.start()

    def update(self, done: int, best: float | None) -> None:
        """Show `done` trials and the best value."""
        if self._progress is not None:
            text = "" if best is None else f"best val loss {best:.4f}"
            self._progress.update(self._task, completed=done, best=text)

    def close(self) -> None:
        """Stop the live display."""
        if self._progress is not None:
            self._progress.stop()


def _fmt(value: Any, spec: str = ".3g") -> str:
    if isinstance(value, float):
        return format(value, spec)
    return "-" if value is None else str(value)


_SHORT = {"batch_size": "batch", "grad_accum": "accum", "weight_decay": "wd",
          "precision": "prec", "clip_norm": "clip", "warmup": "warm"}  # fmt: skip


def console_table(result: SearchResult, rows: int = 10) -> Table:
    """The best trials, some others and the baseline (`*`): state, loss, settings, tokens/s.

    A trial stopped by the pruner shows where (`PRUNED 2/4`); the reasons of other stopped or
    failed trials are listed under the table, and every reason is in trials.csv.
    """
    states = [t.state for t in result.trials]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
    done = sorted((t for t in result.trials if t.state == "COMPLETE"), key=lambda t: t.value)
    shown = done[:rows] + [t for t in result.trials if t.state != "COMPLETE"][: rows // 2]
    shown += [t for t in result.trials if t.baseline and t not in shown]
    shown.sort(key=lambda t: (t.state != "COMPLETE", t.value or 0, t.number))
    notes = [f"trial {t.number}: {t.reason[:100]}" for t in shown
             if t.reason and not t.reason.startswith("pruned at")]  # fmt: skip
    table = Table(title=f"amptrain search: study {result.study_name!r}, {counts}",
                  caption="\n".join([*notes, _verdict(result)]), box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)  # fmt: skip
    names = sorted({k for t in result.trials for k in t.params})
    for header in ("trial", "state", "loss", *[_SHORT.get(n, n) for n in names], "tok/s"):
        table.add_column(header)
    for t in shown:
        pruned_at = re.match(r"pruned at step (\d+/\d+)", t.reason or "")
        state = f"{t.state} {pruned_at.group(1)}" if pruned_at else t.state
        settings = [_fmt(t.params.get(n), ".2e" if n == "lr" else ".2g") for n in names]
        table.add_row(f"{t.number}{'*' if t.baseline else ''}", state, _fmt(t.value, ".4f"),
                      *settings, _fmt(t.metrics.get("tokens_per_s"), ".0f"))  # fmt: skip
    return table


def _verdict(result: SearchResult) -> str:
    if result.best_value is None:
        return "no trial completed"
    text = f"val loss of the best trial {result.best_number}: {result.best_value:.4f}"
    if result.baseline_value is not None:
        change = result.best_value / result.baseline_value - 1
        text += (f"; of the base settings (trial {result.baseline_number}*): "
                 f"{result.baseline_value:.4f} ({change:+.1%})")  # fmt: skip
    if result.pareto_front:
        front = ", ".join(str(n) for n in result.pareto_front)
        text += f"; Pareto front (val loss vs tokens/s): trials {front}"
    return text


def write_outputs(
    result: SearchResult, run_dir: str | Path, cfg: Any, settings: dict[str, Any] | None = None
) -> Path:
    """Write config.json, trials.csv, best.json and (with the plot extra) the plots.

    `config.json` holds the base config `cfg`, the command's own options `settings` and the
    study's settings (with the storage URL redacted), so `--config` reruns the search.
    """
    from amptrain.runs import write_config

    run_dir = make_dirs(run_dir)  # a database storage keeps nothing in it before this
    study = {"study_name": result.study_name, "storage": result.storage, **result.settings}
    write_config(run_dir, "search", cfg, {**(settings or {}), "study": study})
    atomic_write_bytes(run_dir / "trials.csv", trials_csv(result).encode())
    best = next((t for t in result.trials if t.number == result.best_number), None)
    atomic_write_json(run_dir / "best.json", {
        "study_name": result.study_name, "objectives": list(result.objectives),
        "n_trials": result.n_trials, "number": result.best_number, "value": result.best_value,
        "values": result.best_values, "params": result.best_params,
        "metrics": None if best is None else best.metrics, "command": result.best_command,
        "baseline": {"number": result.baseline_number, "value": result.baseline_value},
        "pareto_front": list(result.pareto_front),
    })  # fmt: skip
    if MATPLOTLIB_AVAILABLE and result.study is not None:
        plot_search(result, run_dir)
    elif not MATPLOTLIB_AVAILABLE:
        log.info("search plots skipped: install amptrain[plot] for plots")
    return run_dir


def trials_csv(result: SearchResult) -> str:
    """One row per trial: number, state, value(s), each parameter, reason, duration, figures."""
    names = sorted({k for t in result.trials for k in t.params})
    extra = [f"value_{o}" for o in result.objectives[1:]]
    figures = [m for m in _METRICS if m not in names]  # a searched precision is a column already
    front = ["pareto"] if len(result.objectives) > 1 else []
    fields = ["number", "state", "value", *extra, *front, *names, "reason", "duration_s",
              "baseline", "counted", "retry_of", *figures]  # fmt: skip
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for t in result.trials:
        row = {"number": t.number, "state": t.state, "value": t.value, "reason": t.reason,
               "duration_s": t.duration_s, "baseline": t.baseline, "counted": t.counted,
               "retry_of": t.retry_of, **{k: t.metrics.get(k) for k in figures},
               **t.params}  # fmt: skip
        row.update(zip(extra, (t.values or ())[1:]))
        if front:
            row["pareto"] = t.number in result.pareto_front
        writer.writerow(row)
    return out.getvalue()


def plot_search(result: SearchResult, run_dir: str | Path) -> list[Path]:
    """history.png, importances.png and parallel.png from the study; returns those written."""
    from amptrain.runs.plotting import pyplot, save_figure

    plt = pyplot()
    import optuna.visualization.matplotlib as ov

    run_dir, study = Path(run_dir), result.study
    target = {"target": lambda t: t.values[0], "target_name": "val loss"}
    done = [t for t in result.trials if t.state == "COMPLETE"]
    plots = [("history.png", ov.plot_optimization_history),
             ("parallel.png", ov.plot_parallel_coordinate)]  # fmt: skip
    if len(done) >= 2 and len(result.best_params or {}) >= 1:
        plots.insert(1, ("importances.png", ov.plot_param_importances))
    else:
        log.info("importances.png skipped: %d complete trial(s), need 2", len(done))
    written = []
    for name, draw in plots:
        # Optuna's plots switch the global style to ggplot; keep that inside this block.
        with plt.style.context("default"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning of optuna's matplotlib API
            try:
                axes = draw(study, **target)
            except (ValueError, RuntimeError) as exc:  # e.g. importances of constant values
                log.info("%s skipped: %s", name, exc)
                continue
        figure = getattr(axes, "figure", None) or plt.gcf()
        _readable(name, figure, len(done))
        written.append(save_figure(figure, run_dir / name))
    return written


ROUGH_IMPORTANCES = 10  # complete trials below which parameter importances are noise


def _readable(name: str, figure: Any, n_done: int) -> None:
    """Make Optuna's figure readable: no overlapping ticks, no near-white lines, a caveat."""
    from matplotlib.ticker import MaxNLocator

    figure.set_size_inches(9, 5)
    for ax in figure.axes:
        if name == "history.png":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers are whole
        for label in ax.get_xticklabels() if name == "parallel.png" else ():
            label.set_rotation(25)  # the parameter names overlap when level
            label.set_horizontalalignment("right")
        for collection in ax.collections:  # parallel coordinates: "Blues" draws the worst white
            if collection.get_array() is not None:
                collection.set_cmap("viridis_r")
    if name == "importances.png" and n_done < ROUGH_IMPORTANCES:
        figure.text(0.01, 0.01, f"from {n_done} complete trials only: importances are rough "
                    f"below {ROUGH_IMPORTANCES}", fontsize=9, color="darkred")  # fmt: skip
    figure.tight_layout(rect=(0, 0.04, 1, 1))
