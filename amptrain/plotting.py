"""PNG charts (the `plot` extra). matplotlib is imported here only, with the Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amptrain._imports import requires


def plot_training(records: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Training and validation loss, and the learning rate, against the optimizer step."""
    requires("matplotlib", "plot", "loss plots", "read metrics.csv instead")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
