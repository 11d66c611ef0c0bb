"""Interleaved rounds of benchmark arms, and the one statistic every benchmark reports.

One machine's speed drifts (other jobs, frequency, caches), so a benchmark runs every arm once
per round with the order rotated each round. Every ratio between two arms, in every benchmark
and every figure the docs quote, is the same statistic (`ratio`): the ratio of the arms' medians
over the rounds, with the min-max of the per-round ratios beside it. A verdict (faster, slower)
is given only where at least `MIN_ROUNDS` rounds ran and every round agrees: with no real
difference, all n rounds fall on one side by chance with probability 2^(1-n), a quarter of the
time with 3 rounds and 6 % with 5 (`chance_all_agree`). An arm whose spread over rounds
((max - min) / median) exceeds `WIDE_SPREAD` makes the verdict inconclusive: the machine was
not quiet. `peers.py`, `epilogue.py` and `working_copy.py` share these helpers.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

WIDE_SPREAD = 0.10
"""An arm whose tokens/s range over rounds exceeds this fraction of its median is flagged."""
MIN_ROUNDS = 5
"""Rounds a verdict needs, all agreeing."""


def round_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options of a benchmark in rounds: rounds, steps, warm-up steps, the result file."""
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out (compile included)")
    parser.add_argument("--quick", action="store_true", help="tiny and short: does it run?")
    parser.add_argument("--out", type=Path, default=None, help="default: a new results/ file")


def parse_rounds(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed options, refused in one line (exit 2) where they leave nothing to measure."""
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 6, 2
    if args.steps < args.warmup + 3:
        parser.error(f"--steps {args.steps} leaves under 2 timed steps after --warmup "
                     f"{args.warmup}: give --steps {args.warmup + 3} or more")  # fmt: skip
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more ({MIN_ROUNDS} for a verdict)")
    return args


def interleave(
    arms: dict[str, Callable[[], dict]], rounds: int, say: Callable[[str], None] = print
) -> dict[str, list[dict]]:
    """Each arm's results over `rounds` rounds, the order of the arms rotated each round."""
    names, runs = list(arms), {name: [] for name in arms}
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            runs[name].append(arms[name]())
            say(f"round {round_ + 1}/{rounds} {name}: {runs[name][-1]}")
    return runs


def summary(rates: list[float]) -> dict:
    """Runs, median tokens/s, its min-max range and the spread over rounds."""
    median = statistics.median(rates)
    return {"runs": len(rates), "tokens_per_s_median": median,
            "tokens_per_s_range": [min(rates), max(rates)],
            "spread": (max(rates) - min(rates)) / median}  # fmt: skip


def chance_all_agree(rounds: int) -> float:
    """How often all `rounds` per-round ratios fall on one side of 1 with no real difference."""
    return 2.0 ** (1 - rounds)


def ratio(rates: list[float], base_rates: list[float], quiet: bool = True) -> dict:
    """An arm against the reference over the same rounds (a round where either failed is left
    out by the caller): the ratio of medians, the min-max of the per-round ratios, and a
    verdict only where at least `MIN_ROUNDS` rounds ran, all agree, and the machine was `quiet`
    (no arm's spread over `WIDE_SPREAD`)."""
    ratios = [r / b for r, b in zip(rates, base_rates, strict=True)]
    lo, hi, n = min(ratios), max(ratios), len(ratios)
    if n < MIN_ROUNDS:
        said = (f"inconclusive: {n} round(s), {MIN_ROUNDS} needed (all {n} agree by chance "
                f"{chance_all_agree(n):.0%} of the time)")  # fmt: skip
    elif not quiet:
        said = f"inconclusive: a spread over {WIDE_SPREAD:.0%}, the machine was not quiet"
    elif lo > 1:
        said = f"faster in all {n} rounds"
    elif hi < 1:
        said = f"slower in all {n} rounds"
    else:
        said = "inconclusive: the rounds disagree"
    return {"ratio_of_medians": statistics.median(rates) / statistics.median(base_rates),
            "ratio_range": [lo, hi], "rounds": n, "verdict": said,
            "chance_all_agree": chance_all_agree(n)}  # fmt: skip


def compare(runs: dict[str, list[dict]], reference: str) -> list[dict]:
    """One row per arm: `summary` of its `tokens_per_s`, its median `loss`, and both against
    the reference arm's (`ratio`, the relative loss)."""
    rows = [{"arm": arm, **summary([r["tokens_per_s"] for r in results]),
             "loss": statistics.median(r["loss"] for r in results)}
            for arm, results in runs.items()]  # fmt: skip
    base = next(r for r in rows if r["arm"] == reference)
    for row in rows:
        if row is not base:
            quiet = max(row["spread"], base["spread"]) <= WIDE_SPREAD
            rates = [r["tokens_per_s"] for r in runs[row["arm"]]]
            row["vs_reference"] = ratio(rates, [r["tokens_per_s"] for r in runs[reference]], quiet)
        row["loss_vs_reference"] = row["loss"] / base["loss"] - 1
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table of `compare`'s rows."""
    out = ["| arm | tokens/s median (min-max) | spread | x reference (rounds min-max) "
           "| verdict | loss (vs ref) |",
           "|---|---|---:|---|---|---|"]  # fmt: skip
    for r in rows:
        lo, hi = r["tokens_per_s_range"]
        pair = r.get("vs_reference")
        cells = ["1.000", "reference"]
        if pair:
            p_lo, p_hi = pair["ratio_range"]
            cells = [f"{pair['ratio_of_medians']:.3f} ({p_lo:.3f}-{p_hi:.3f})", pair["verdict"]]
        out.append(f"| {r['arm']} | {r['tokens_per_s_median']:,.0f} ({lo:,.0f}-{hi:,.0f}) "
                   f"| {r['spread']:.0%} | {' | '.join(cells)} "
                   f"| {r['loss']:.4f} ({r['loss_vs_reference']:+.2%}) |")  # fmt: skip
    return "\n".join(out)
