"""The PNG chart of a `CompareReport` (the `plot` extra); matplotlib comes through `plotting`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amptrain.runs.plotting import pyplot, save_figure, wrapped


def plot_compare(report: Any, path: str | Path) -> Path:
    """Write the comparison's chart to `path`.

    Same-budget: per-seed validation loss (paired) and throughput. Pretrained: bits per byte
    and forward latency per 1000 bytes.
    """
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if report.mode == "same-budget":
        _paired_losses(left, report)
        _bars(right, report, "tokens_per_s", "train tokens/s (mean, bars: min-max over seeds)")
    else:
        names = [f"{s.role}\n{s.name[-30:]}" for s in report.scores]
        left.bar(names, [s.bits_per_byte for s in report.scores], color=["C0", "C1"])
        left.set(title="bits per byte of the held-out text (lower is better)", ylabel="bits/byte")
        right.bar(names, [s.latency_ms_per_kb for s in report.scores], color=["C0", "C1"])
        right.set(title="forward latency per 1000 bytes (median)", ylabel="ms")
    fig.suptitle(wrapped(f"amptrain compare: {report.verdict}", 120), fontsize=9)
    return save_figure(fig, path)


def _paired_losses(ax: Any, report: Any) -> None:
    """One line per seed from the custom model's loss to the reference's, and the means."""
    custom = [r for r in report.runs if r.role == "custom"]
    reference = {r.seed: r for r in report.runs if r.role == "reference"}
    for r in custom:
        ax.plot([0, 1], [r.val_loss, reference[r.seed].val_loss], "o-", color="0.6", lw=1)
    label_seeds(ax, [(r.seed, reference[r.seed].val_loss) for r in custom])
    stat = report.stat("val_loss")
    ax.errorbar([0, 1], [stat.custom_mean, stat.reference_mean],
                yerr=[stat.custom_sd, stat.reference_sd], fmt="s", color="C3", capsize=6,
                label="mean ± sd")  # fmt: skip
    ax.set_xticks([0, 1], [f"custom\n{report.model('custom').name}",
                           f"reference\n{report.model('reference').name}"])  # fmt: skip
    ax.set_xlim(-0.4, 1.6)
    ax.set(title=f"validation loss per seed (paired t-test p={stat.p_value:.3g})",
           ylabel="nats/token")  # fmt: skip
    ax.legend(fontsize=8)


def label_seeds(ax: Any, points: list[tuple[int, float]]) -> None:
    """Name each seed right of its reference point, labels pushed apart so none overlap."""
    if not points:
        return
    values = [v for _, v in points]
    low, high = ax.get_ylim()
    gap = (max(high, max(values)) - min(low, min(values))) * 0.06  # about one label's height
    placed: list[float] = []
    for seed, value in sorted(points, key=lambda p: p[1]):
        y = max(value, placed[-1] + gap) if placed else value
        placed.append(y)
        ax.annotate(f"seed {seed}", (1, value), xytext=(1.08, y), fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.7", "lw": 0.5})  # fmt: skip


def _bars(ax: Any, report: Any, metric: str, title: str) -> None:
    # The seeds' own range: a mean ± sd bar can reach below zero, which no run could.
    stat = report.stat(metric)
    means = [stat.custom_mean, stat.reference_mean]
    values = [[getattr(r, metric) for r in report.runs if r.role == role]
              for role in ("custom", "reference")]  # fmt: skip
    low = [m - min(v) for m, v in zip(means, values)]
    high = [max(v) - m for m, v in zip(means, values)]
    ax.bar(["custom", "reference"], means, yerr=[low, high], capsize=6, color=["C0", "C1"])
    ax.set(title=title, ylabel=metric.replace("tokens_per_s", "tokens/s"))
