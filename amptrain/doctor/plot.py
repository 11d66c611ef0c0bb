"""The doctor's PNG (the `plot` extra): fp16 headroom per module, forward and backward."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from amptrain.runs.plotting import pyplot, save_figure

_CAP = 40.0  # bits shown at most; an all-zero output has infinite headroom


def _clip(bits: float | None) -> float:
    if bits is None:
        return 0.0
    return max(min(bits, _CAP), -_CAP) if not math.isnan(bits) else -_CAP


def _legend(ax: Any, margin: float) -> None:
    """What the colours and the two lines mean."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Patch(color="tab:green", label=f"fp16 safe: {margin:g}+ bits of headroom"),
        Patch(color="tab:orange", label=f"near overflow: under {margin:g} bits"),
        Patch(color="tab:red", label="overflows fp16 (below 0)"),
        Patch(color="tab:gray", label="no gradient reached it"),
        Line2D([], [], color="tab:orange", linestyle="--", label=f"margin ({margin:g} bits)"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.9)


def plot_headroom(report: Any, path: str | Path) -> Path:
    """Horizontal bars of forward and backward fp16 headroom (bits) per module, in model order.

    Bars left of 0 overflow fp16 (red); bars between 0 and the margin are flagged (orange).

    Args:
        report: A `DoctorReport`.
        path: Where to write the PNG.

    Returns:
        The path written.
    """
    plt = pyplot()
    rows = list(report.layers)
    margin = report.settings["margin_bits"]
    height = max(4.0, 0.22 * len(rows) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    labels = [r.name for r in rows]
    panels = (
        ("forward: activations", [r.act_headroom_bits for r in rows]),
        (f"backward: gradients x {report.settings['loss_scale']:g}",
         [r.grad_headroom_bits for r in rows]),
    )  # fmt: skip
    for ax, (title, bits) in zip(axes, panels):
        colors = ["tab:gray" if b is None else "tab:red" if b < 0 else
                  "tab:orange" if b < margin else "tab:green" for b in bits]  # fmt: skip
        ax.barh(range(len(rows)), [_clip(b) for b in bits], color=colors)
        ax.axvline(0, color="tab:red", linewidth=1)
        ax.axvline(margin, color="tab:orange", linewidth=1, linestyle="--")
        ax.set(title=title, xlabel="fp16 headroom, bits (log2 65504 / abs max)")
    _legend(axes[1], margin)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("\n".join(textwrap.wrap(f"amptrain doctor: {report.verdict}", 150)), fontsize=9)
    return save_figure(fig, path)
