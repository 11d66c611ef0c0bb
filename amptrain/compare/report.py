"""Presentation of a `CompareReport`: the console table, the files, the verdict and the method.

Files written to a run directory: compare.json, compare.csv, report.md and, with the `plot`
extra, compare.png. The statistics behind the figures are in `amptrain.compare.stats`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from amptrain._imports import MATPLOTLIB_AVAILABLE
from amptrain.compare.command import run_compare
from amptrain.compare.stats import MetricStats
from amptrain.runs import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from amptrain.compare import CompareReport

# `run_compare` lives in command.py; the CLI imports it from here, so it is re-exported.
__all__ = [
    "BUDGET_METHOD", "TEXT_METHOD", "budget_verdict", "console_table", "markdown",
    "run_compare", "text_verdict", "write_report",
]  # fmt: skip


def _num(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        format(value, spec))  # fmt: skip


_SPECS = {"val_loss": ".4f", "val_perplexity": ".3f", "val_accuracy": ".4f", "tokens_per_s": ",.0f"}
_LABELS = {"val_loss": "val loss (nats/token)", "val_perplexity": "val perplexity",
           "val_accuracy": "val accuracy", "tokens_per_s": "train tokens/s"}  # fmt: skip


def _budget_rows(report: CompareReport) -> tuple[list[str], list[list[str]]]:
    custom, ref = report.model("custom"), report.model("reference")
    level = 1 - report.settings["alpha"]
    headers = ["", "custom", "reference", f"difference ({level:.0%} CI)", "p (paired t)"]
    rows = [["model", custom.name, ref.name, "custom - reference", ""],
            ["parameters", f"{custom.parameters:,}", f"{ref.parameters:,}",
             f"{custom.parameters / ref.parameters - 1:+.1%}", ""]]  # fmt: skip
    for s in report.stats:
        spec = _SPECS[s.metric]
        rows.append([
            _LABELS[s.metric],
            f"{format(s.custom_mean, spec)} ± {format(s.custom_sd, spec)}",
            f"{format(s.reference_mean, spec)} ± {format(s.reference_sd, spec)}",
            f"{s.diff_mean:+{spec}} ({s.ci_low:+{spec}} to {s.ci_high:+{spec}})",
            f"{s.p_value:.3g}" + ("" if s.better == "neither" else f" ({s.better} better)"),
        ])  # fmt: skip
    mem_diff = "-" if custom.mem_mb is None or ref.mem_mb is None else (
        f"{custom.mem_mb - ref.mem_mb:+.0f}")  # fmt: skip
    rows.append(["peak memory MB (4-step run)", _num(custom.mem_mb, ".0f"),
                 _num(ref.mem_mb, ".0f"), mem_diff, ""])  # fmt: skip
    return headers, rows


def _pretrained_rows(report: CompareReport) -> tuple[list[str], list[list[str]]]:
    scores = report.scores
    headers = ["", *[f"{s.role}: {s.name}" for s in scores]]
    info = {m.role: m for m in report.models}
    rows = [
        ["bits per byte (lower is better)", *[f"{s.bits_per_byte:.4f}" for s in scores]],
        ["parameters", *[f"{info[s.role].parameters:,}" for s in scores]],
        ["tokenizer", *[s.tokenizer for s in scores]],
        ["tokens (bytes/token)", *[f"{s.tokens:,} ({s.bytes / s.tokens:.2f})" for s in scores]],
        ["nats/token, own tokens (not comparable)",
         *[f"{s.nats / max(s.scored_tokens, 1):.4f}" for s in scores]],
        ["latency ms, median forward of one window", *[
            f"{s.latency_ms:.2f} ({s.window} tokens)" for s in scores]],
        ["latency ms per 1000 bytes", *[f"{s.latency_ms_per_kb:.2f}" for s in scores]],
        ["weights MB", *[f"{info[s.role].weights_mb:.3g}" for s in scores]],
        ["peak memory MB (scoring)", *[_num(info[s.role].mem_mb, ".0f") for s in scores]],
    ]  # fmt: skip
    return headers, rows


def _rows(report: CompareReport) -> tuple[list[str], list[list[str]]]:
    return _budget_rows(report) if report.mode == "same-budget" else _pretrained_rows(report)


def console_table(report: CompareReport) -> Table:
    """The comparison as a rich table, with the verdict as its caption."""
    s = report.settings
    if report.mode == "same-budget":
        title = (f"amptrain compare (same budget): {len(s['seeds'])} seeds x {s['steps']} steps, "
                 f"batch {s['batch_size']} x context {s['context']}, {s['precision']}")  # fmt: skip
    else:
        title = (f"amptrain compare (pretrained): {s['bytes']:,} bytes of held-out text, "
                 f"{s['precision']}")  # fmt: skip
    headers, rows = _rows(report)
    table = Table(title=title, caption=f"verdict: {report.verdict}")
    table.add_column(headers[0], style="bold", overflow="fold")
    for header in headers[1:]:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def write_report(report: CompareReport, run_dir: str | Path) -> Path:
    """Write compare.json, compare.csv, report.md and (with the plot extra) compare.png."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "compare.json", report.to_dict())
    atomic_write_bytes(run_dir / "compare.csv", _csv(report).encode())
    if MATPLOTLIB_AVAILABLE:
        from amptrain.compare.plot import plot_compare

        plot_compare(report, run_dir / "compare.png")
    atomic_write_bytes(run_dir / "report.md", markdown(report).encode())
    return run_dir


def _csv(report: CompareReport) -> str:
    """One row per training run (same-budget) or per scored model (pretrained)."""
    records = report.runs if report.mode == "same-budget" else report.scores
    names = {m.role: m.name for m in report.models}
    out = io.StringIO()
    fields = ["name", *(f.name for f in dataclasses.fields(records[0]))]
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for record in records:
        writer.writerow({"name": names[record.role], **dataclasses.asdict(record)})
    return out.getvalue()


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(report: CompareReport) -> str:
    """report.md: the verdict, the table, the per-seed runs or scores, the method, conditions."""
    headers, rows = _rows(report)
    lines = ["# Baseline comparison", "", f"**Verdict:** {report.verdict}", ""]
    lines += _md_table(headers, rows)
    if report.mode == "same-budget":
        lines += ["", "## Runs", ""]
        run_headers = ["seed", "model", "val loss", "val accuracy", "train loss", "tokens/s"]
        run_rows = [
            [str(r.seed), r.role, f"{r.val_loss:.4f}", f"{r.val_accuracy:.4f}",
             f"{r.train_loss:.4f}", f"{r.tokens_per_s:,.0f}"]
            for r in report.runs
        ]  # fmt: skip
        lines += _md_table(run_headers, run_rows)
    lines += ["", "## Method", "", *[f"- {m}" for m in report.settings["method"]]]
    env = report.environment
    lines += ["", "## Conditions", "",
              f"- device {env['device']}, torch {env['torch']}, {env['cpu_threads']} CPU threads",
              f"- settings: {_settings_line(report.settings)}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _settings_line(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "method")


BUDGET_METHOD = (
    "both models train from fresh weights with AdamW, the same warm-up + cosine schedule, the "
    "same steps, batches (the seed fixes the batch order) and precision; seeds alternate which "
    "model trains first",
    "validation figures are the final evaluation on the same held-out batches",
    "statistics: mean ± sample standard deviation over seeds; a paired two-sided t-test of the "
    "per-seed differences (custom - reference), Student's t computed exactly with the standard "
    "library; the interval is the t interval of the mean difference",
    "memory: peak increment of a short (4-step) training run per model: a forked worker's "
    "peak RSS on CPU, the allocator's peak on CUDA",
)
TEXT_METHOD = (
    "each model tokenizes the same held-out text with its own tokenizer; bits per byte = summed "
    "next-token cross-entropy in nats / (ln 2 x UTF-8 bytes of the text)",
    "windows of the model's context overlap by half a window; every token but the first is "
    "scored exactly once, with at least half a window of context",
    "perplexities over different vocabularies are not comparable and are not compared",
    "latency: median of the timed forwards of one window (batch 1) after 3 warm-up forwards, "
    "synchronised on CUDA; memory: peak increment while scoring (forked worker's RSS on CPU)",
)


def budget_verdict(s: MetricStats, models: Sequence[Any], n: int, alpha: float) -> str:
    """One sentence on the validation loss of a same-budget comparison."""
    custom, ref = models[0].name, models[1].name
    interval = (f"{s.diff_mean:+.4f} nats/token ({1 - alpha:.0%} CI {s.ci_low:+.4f} to "
                f"{s.ci_high:+.4f}; paired t-test over {n} seeds, p={s.p_value:.3g})")  # fmt: skip
    if s.better == "neither":
        return (f"no significant difference in validation loss between {custom} and {ref}: "
                f"custom - reference = {interval}")  # fmt: skip
    winner = custom if s.better == "custom" else ref
    return f"{winner} reaches the lower validation loss: custom - reference = {interval}"


def text_verdict(scores: Sequence[Any]) -> str:
    """One sentence on the bits per byte of a pretrained comparison."""
    custom, base = scores
    ratio = custom.bits_per_byte / base.bits_per_byte - 1
    word = "fewer" if ratio < 0 else "more"
    return (
        f"custom {custom.bits_per_byte:.4f} bits/byte vs baseline {base.bits_per_byte:.4f}: "
        f"the custom model needs {abs(ratio):.1%} {word} bits per byte of this text"
    )
