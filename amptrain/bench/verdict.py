"""The benchmark's verdict: the fastest precision, or "inconclusive" when noise hides the order.

A shared machine can make a precision look 2x slower than it is; a confident verdict on such
figures is worse than none. So the verdict ranks two arms only when their step-time IQRs and
their repeat medians are apart and neither spreads too wide.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from amptrain.bench import arms

if TYPE_CHECKING:
    from amptrain.bench import ArmResult

# An arm whose step-time IQR spans more than this fraction of its median is too noisy to rank.
MAX_SPREAD = 0.5


def verdict(rows: Sequence[ArmResult], tol: float) -> tuple[str | None, str]:
    """The best precision and why, or None and "inconclusive: ..." when noise hides the order.

    The fastest arm whose quality is ok is compared with the runner-up: when either arm's
    step times spread wider than `MAX_SPREAD` of its median, or their IQRs or repeat medians
    overlap, the order is not measured, and the verdict says so, with the load average
    where it is high.
    """
    good = sorted((r for r in rows if r.status == "ok" and r.quality_ok
                   and not arms.is_lora(r.precision)),
                  key=lambda r: r.tokens_per_s, reverse=True)  # fmt: skip
    if not good:
        return None, "no precision ran to completion with fp32 as the reference"
    best = good[0]
    noise = inseparable(best, good[1]) if len(good) > 1 else None
    if noise is not None:
        return None, f"inconclusive: {noise}{_load_note()}; rerun on a quieter machine"
    if best.precision == "fp32":
        return "fp32", (
            f"fp32: no other precision was both faster and within {tol:.0%} of fp32's "
            "validation loss"
        )
    return best.precision, (
        f"{best.precision}: {best.speedup_vs_fp32:.2f}x fp32's tokens/s (median step "
        f"{best.step_ms:.1f} ms vs {best.step_ms * best.speedup_vs_fp32:.1f} ms), validation loss "
        f"{best.val_loss_rel_diff:+.2%} from fp32 (tolerance {tol:.0%})"
    )


def cheapest(
    rows: Sequence[ArmResult], tol: float, batch_size: int, budget: str | None = None
) -> str:
    """The arm that keeps quality with the least memory (and fits `budget`, where given).

    LoRA arms train other weights and are left out. Memory is each arm's measured increment;
    with a budget an arm fits when its largest batch reaches the benchmark's batch size.
    """
    good = [r for r in rows if r.status == "ok" and r.quality_ok and r.mem_mb is not None
            and not arms.is_lora(r.precision)]  # fmt: skip
    if budget is not None:
        good = [r for r in good if (r.largest_batch or 0) >= batch_size]
    where = f" and fits {budget} at batch {batch_size}" if budget else ""
    if not good:
        return f"memory: no arm with its memory measured kept quality{where}"
    best = min(good, key=lambda r: r.mem_mb)
    line = (f"memory: {best.precision} keeps quality{where} with the least memory: "
            f"{best.mem_mb:,.0f} MB")  # fmt: skip
    ref = next((r for r in rows if r.precision == "fp32" and r.mem_mb), None)
    if ref is not None and best.precision != "fp32":
        line += f" ({best.mem_mb / ref.mem_mb:.2f}x fp32's)"
    if best.largest_batch is not None:
        line += f", batches up to {best.largest_batch} within {budget}"
    return line


def inseparable(a: ArmResult, b: ArmResult) -> str | None:
    """Why the step times of two arms cannot be told apart, or None when they can."""
    for arm in (a, b):
        low, high = arm.step_ms_iqr
        if high - low > MAX_SPREAD * arm.step_ms:
            return (f"{arm.precision}'s step times spread too wide to rank (IQR {low:.1f}-"
                    f"{high:.1f} ms around a median of {arm.step_ms:.1f} ms)")  # fmt: skip
    for field, what in (("step_ms_iqr", "step-time IQRs"), ("repeat_ms_range", "repeat medians")):
        (a_lo, a_hi), (b_lo, b_hi) = getattr(a, field), getattr(b, field)
        if a_lo <= b_hi and b_lo <= a_hi:
            return (f"the {what} of {a.precision} ({a_lo:.1f}-{a_hi:.1f} ms) and "
                    f"{b.precision} ({b_lo:.1f}-{b_hi:.1f} ms) overlap")  # fmt: skip
    return None


def _load_note() -> str:
    """The load average, where it is high enough to explain the noise."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cpus = os.cpu_count() or 1
    return f" (load average {load:.1f} on {cpus} CPUs)" if load > 0.75 * cpus else ""
