"""Statistics and presentation of a `CompareReport`: the paired t-test, console table and files.

The paired t-test is computed here with the standard library only (the t distribution through
the regularized incomplete beta function), so no statistics package is needed. Files written
to a run directory: compare.json, compare.csv, report.md and, with the `plot` extra, compare.png.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from amptrain._imports import MATPLOTLIB_AVAILABLE
from amptrain.config import TrainConfig
from amptrain.errors import ConfigError
from amptrain.runs import atomic_write_bytes, atomic_write_json, create_run_dir, write_config

if TYPE_CHECKING:
    from amptrain.compare import CompareReport


@dataclasses.dataclass(frozen=True)
class MetricStats:
    """One metric over the seeds: each model's mean and sd, and the paired difference."""

    metric: str
    lower_is_better: bool
    custom_mean: float
    custom_sd: float
    reference_mean: float
    reference_sd: float
    diff_mean: float
    """Mean over seeds of (custom - reference)."""
    diff_sd: float
    ci_low: float
    """Lower end of the two-sided (1 - alpha) t interval of the mean difference."""
    ci_high: float
    t: float
    df: int
    p_value: float
    """Two-sided p-value of the paired t-test (H0: mean difference 0)."""
    better: str
    """`custom`, `reference`, or `neither` (p >= alpha)."""


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_critical(alpha: float, df: int) -> float:
    """The t with P(|T| >= t) = alpha, found by bisection on `t_two_sided_p`."""
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > alpha:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_two_sided_p(mid, df) > alpha else (low, mid)
    return (low + high) / 2.0


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by Lentz's continued fraction."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))  # fmt: skip
    # The fraction converges fast only for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float, tiny: float = 1e-300) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for num in (even, odd):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def paired_stats(
    metric: str,
    custom: Sequence[float],
    reference: Sequence[float],
    lower_is_better: bool,
    alpha: float = 0.05,
) -> MetricStats:
    """Mean ± sd of each model and a paired t-test of the per-seed differences.

    Args:
        metric: The metric's name.
        custom: The custom model's value per seed.
        reference: The reference's value per seed, in the same seed order.
        lower_is_better: True for losses, False for accuracy and throughput.
        alpha: Significance level; the interval is the (1 - alpha) two-sided t interval.

    Returns:
        A `MetricStats`. With identical differences (sd 0) the interval is a point and p is
        1 for a zero difference, else 0.
    """
    n = len(custom)
    assert n == len(reference) and n >= 2, "paired_stats needs two equal-length samples, n >= 2"
    diffs = [c - r for c, r in zip(custom, reference)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        half = 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        half = t_critical(alpha, n - 1) * sd / math.sqrt(n)
    p = t_two_sided_p(t, n - 1)
    better = "neither"
    if p < alpha:
        better = "custom" if (mean < 0) == lower_is_better else "reference"
    return MetricStats(
        metric, lower_is_better, statistics.fmean(custom), statistics.stdev(custom),
        statistics.fmean(reference), statistics.stdev(reference), mean, sd, mean - half,
        mean + half, t, n - 1, p, better,
    )  # fmt: skip


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


def run_compare(
    cfg: TrainConfig, args: Any, settings: dict[str, Any] | None = None
) -> tuple[CompareReport, Path]:
    """The `compare` command: build model and data like `train`, compare, write the run.

    Same-budget mode rebuilds the configured model for every seed. Pretrained mode cuts the
    last `--eval-bytes` of the data off as the held-out text, trains the model on the rest for
    `--steps` (0: score it as built), then scores the text with both models.
    """
    from amptrain.compare import REFERENCES, check_baseline_dir, compare

    seeds = _seeds(args.seeds)
    common = dict(
        steps=args.steps, precision=cfg.precision, memory=not args.no_memory,
        name=None if cfg.model == "tiny-gpt" else cfg.model,
        make_sinks=None if args.no_progress else _progress, **_fit_options(cfg),
    )  # fmt: skip
    if args.baseline in REFERENCES:
        from amptrain.train import prepare

        model, train, val, _ = prepare(cfg)
        report = compare(_model_factory(cfg, model), args.baseline, train=train, val=val,
                         seeds=seeds, reference_layers=args.reference_layers, **common)  # fmt: skip
    else:
        check_baseline_dir(args.baseline)  # before the data is read
        model, train, val, text, tokenizer = _held_out(cfg, args.eval_bytes)
        report = compare(model, args.baseline, train=train, val=val, text=text, seeds=seeds[:1],
                         tokenizer=tokenizer, context=cfg.context,
                         latency_iters=args.latency_iters, **common)  # fmt: skip
    run_dir = create_run_dir(cfg.out, "compare")
    write_config(run_dir, "compare", cfg, settings)
    return report, write_report(report, run_dir)


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2"
        ) from None


def _fit_options(cfg: TrainConfig) -> dict[str, Any]:
    """The loop settings compare passes on; steps, seeds and evaluation it sets itself."""
    fixed = ("max_steps", "seed", "eval_every")
    return {k: v for k, v in dataclasses.asdict(cfg.fit).items() if k not in fixed}


def _progress(what: str, total: int) -> list[Any]:
    from amptrain.metrics.console import ProgressSink

    return [ProgressSink(total, f"compare: {what}")]


def _model_factory(cfg: TrainConfig, model: Any) -> Any:
    """Build the configured model afresh (the caller seeds it), on the device `prepare` chose."""
    from amptrain.train import model_factory

    return model_factory(cfg, next(model.parameters()).device)


def _held_out(cfg: TrainConfig, eval_bytes: int) -> tuple[Any, Any, Any, str, Any]:
    """Model, train/val blocks of the data minus its last `eval_bytes`, that text, tokenizer."""
    import torch

    from amptrain import data
    from amptrain.train import model_factory, pick_device, tokenizer_for

    device = pick_device(cfg.device)
    text = data.read_text(cfg.data, cfg.text_field)
    raw = text.encode("utf-8")
    if not 0 < eval_bytes <= len(raw) // 2:
        raise ConfigError(
            f"--eval-bytes {eval_bytes} is invalid: it must be in [1, {len(raw) // 2}] (half of "
            f"the {len(raw):,} bytes of {cfg.data}; the rest trains the model)"
        )
    held_out = raw[-eval_bytes:].decode("utf-8", errors="ignore")  # a suffix of whole characters
    tokenizer = tokenizer_for(cfg)
    ids = torch.tensor(tokenizer.encode(text[: len(text) - len(held_out)]), dtype=torch.long)
    blocks = data.pack(ids, cfg.context, f"{cfg.data} without its last {eval_bytes} bytes")
    train, val = data.split(blocks, cfg.val_fraction, cfg.fit.seed)
    torch.manual_seed(cfg.fit.seed)
    model = model_factory(cfg, device)()
    return model, train, val, held_out, tokenizer
