"""PNG charts (the `plot` extra). matplotlib is imported here only, with the Agg backend."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amptrain._imports import requires


def pyplot():
    """The pyplot module on the Agg backend (no display needed), or the install hint."""
    requires("matplotlib", "plot", "plots", "read the CSV files instead")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wrapped(text: str, width: int = 130) -> str:
    """`text` broken into lines of at most `width` characters, for a figure's title."""
    return "\n".join(line for part in text.splitlines() for line in textwrap.wrap(part, width))


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save atomically (temporary file, then rename) and free the figure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    pyplot().close(fig)
    tmp.chmod(0o644)  # a fixed mode, as every file of a run gets, whatever the umask
    tmp.replace(path)
    return path


def plot_training(records: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Training and validation loss, and the learning rate, against the optimizer step."""
    plt = pyplot()
    steps = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "val/loss" in r]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in steps], [r["train/loss"] for r in steps], label="train")
    ax_loss.plot([r["step"] for r in evals], [r["val/loss"] for r in evals], "o-", label="val")
    ax_loss.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in steps], [r["train/lr"] for r in steps])
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_bench(report: Any, path: str | Path, title: str = "amptrain bench") -> Path:
    """Throughput, memory and training-loss curves per arm of a `BenchReport`, under `title`."""
    plt = pyplot()
    ok = [a for a in report.arms if a.status == "ok"]
    fig, (ax_t, ax_m, ax_l) = plt.subplots(1, 3, figsize=(15, 4))
    names = [a.precision for a in ok]
    tps = [a.tokens_per_s for a in ok]
    # The bars span the step-time IQR, turned into tokens/s (a slow quartile is a low rate).
    # (Clamped at 0: with two timed steps the median can round just past a quartile.)
    low = [max(0.0, t - t * a.step_ms / a.step_ms_iqr[1]) for t, a in zip(tps, ok)]
    high = [max(0.0, t * a.step_ms / a.step_ms_iqr[0] - t) for t, a in zip(tps, ok)]
    ax_t.bar(names, tps, yerr=[low, high], capsize=6)
    ax_t.set(title="throughput (median step; bars: IQR)", ylabel="tokens/s")
    ax_m.bar(names, [a.mem_mb or 0 for a in ok])
    sources = {a.mem_source.split(":")[0] for a in ok
               if a.mem_source and "not measured" not in a.mem_source}  # fmt: skip
    ax_m.set(title=f"memory training adds ({', '.join(sorted(sources)) or 'not measured'})",
             ylabel="MB above the idle process")  # fmt: skip
    styles = ("-", "--", ":", "-.")
    for i, a in enumerate(ok):  # distinct dashes and markers: equal curves stay visible
        every = max(len(a.loss_curve) // 10, 1)
        ax_l.plot(
            range(1, len(a.loss_curve) + 1),
            a.loss_curve,
            styles[i % 4],
            marker="ox+^"[i % 4],
            markevery=every,
            label=a.precision,
        )
    ax_l.set(title="training loss", xlabel="optimizer step", ylabel="loss (nats/token)")
    ax_l.legend(title="precision")
    fig.suptitle(wrapped(title), fontsize=10)
    return save_figure(fig, path)
