"""The statistics of a same-budget comparison: a paired t-test over seeds, standard library only.

Student's t distribution is computed through the regularized incomplete beta function (Lentz's
continued fraction), so no statistics package is needed; `paired_stats` gives each model's mean
and sd over the seeds and the t interval and p-value of the per-seed differences.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence


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
