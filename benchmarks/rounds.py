"""Interleaved rounds of benchmark arms, and what may be said of them.

One machine's speed drifts (other jobs, frequency, caches), so a benchmark runs every arm once
per round with the order rotated each round, and reports per arm the median over rounds, the
min-max range and the spread ((max - min) / median). A ratio between two arms is told apart
only when their ranges do not overlap; where an arm's spread exceeds `WIDE_SPREAD` the verdict
that includes the spread calls it inconclusive. The paired verdict compares two arms round by
round instead (their ratio in each round), which cancels the drift between rounds; it tells the
arms apart only when every round agrees. `peers.py`, `epilogue.py` and
`working_copy.py` share these helpers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

WIDE_SPREAD = 0.10
"""An arm whose tokens/s range over rounds exceeds this fraction of its median is flagged."""


def round_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options of a benchmark in rounds: rounds, steps, warm-up steps, the result file."""
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out (compile included)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/...")


def parse_rounds(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed options, refused in one line (exit 2) where they leave nothing to measure."""
    args = parser.parse_args()
    if args.steps < args.warmup + 3:
        parser.error(f"--steps {args.steps} leaves under 2 timed steps after --warmup "
                     f"{args.warmup}: give --steps {args.warmup + 3} or more")  # fmt: skip
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more (3 for a verdict)")
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


def verdict(row: dict, base: dict) -> str:
    """Whether the arm's speed is told apart from the reference's: ranges that overlap are not."""
    if row is base:
        return "reference"
    lo, hi = row["tokens_per_s_range"]
    base_lo, base_hi = base["tokens_per_s_range"]
    if row["runs"] < 2 or base["runs"] < 2:
        return "inconclusive: one run per arm"
    if lo > base_hi:
        return "faster (ranges apart)"
    if hi < base_lo:
        return "slower (ranges apart)"
    return "inconclusive: ranges overlap"


def paired(rates: list[float], base_rates: list[float]) -> dict:
    """The arm's speed over the reference's, round by round (the two ran minutes apart at most,
    so the machine's drift between rounds cancels): the median ratio, its min-max, and a verdict
    that tells the arm apart only where every round agrees. Rounds where either arm failed are
    left out by the caller."""
    ratios = [r / b for r, b in zip(rates, base_rates, strict=True)]
    lo, hi = min(ratios), max(ratios)
    if len(ratios) < 3:
        said = f"inconclusive: {len(ratios)} paired round(s), 3 needed"
    elif lo > 1:
        said = f"faster in all {len(ratios)} rounds"
    elif hi < 1:
        said = f"slower in all {len(ratios)} rounds"
    else:
        said = "inconclusive: the rounds disagree"
    return {"ratio_median": statistics.median(ratios), "ratio_range": [lo, hi], "verdict": said}


def verdict_within_spread(row: dict, base: dict) -> str:
    """`verdict`, but inconclusive as well when either arm's spread exceeds `WIDE_SPREAD`."""
    if row is not base and max(row["spread"], base["spread"]) > WIDE_SPREAD:
        return f"inconclusive: spread over {WIDE_SPREAD:.0%}"
    return verdict(row, base)


def compare(runs: dict[str, list[dict]], reference: str) -> list[dict]:
    """One row per arm: `summary` of its `tokens_per_s`, its median `loss`, and both against
    the reference arm's (speed ratio, verdict, relative loss)."""
    rows = [{"arm": arm, **summary([r["tokens_per_s"] for r in results]),
             "loss": statistics.median(r["loss"] for r in results)}
            for arm, results in runs.items()]  # fmt: skip
    base = next(r for r in rows if r["arm"] == reference)
    for row in rows:
        row["speed_vs_reference"] = row["tokens_per_s_median"] / base["tokens_per_s_median"]
        row["verdict"] = verdict_within_spread(row, base)
        if row is not base:
            row["paired"] = paired([r["tokens_per_s"] for r in runs[row["arm"]]],
                                   [r["tokens_per_s"] for r in runs[reference]])  # fmt: skip
        row["loss_vs_reference"] = row["loss"] / base["loss"] - 1
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table of `compare`'s rows."""
    out = ["| arm | tokens/s median (min-max) | spread | x reference | verdict "
           "| paired by round (min-max) | loss (vs ref) |",
           "|---|---|---:|---:|---|---|---|"]  # fmt: skip
    for r in rows:
        lo, hi = r["tokens_per_s_range"]
        pair = r.get("paired")
        by_round = "reference"
        if pair:
            p_lo, p_hi = pair["ratio_range"]
            by_round = f"{pair['verdict']} ({p_lo:.3f}-{p_hi:.3f})"
        out.append(f"| {r['arm']} | {r['tokens_per_s_median']:,.0f} ({lo:,.0f}-{hi:,.0f}) "
                   f"| {r['spread']:.0%} | {r['speed_vs_reference']:.3f} | {r['verdict']} "
                   f"| {by_round} | {r['loss']:.4f} ({r['loss_vs_reference']:+.2%}) |")  # fmt: skip
    return "\n".join(out)


def write_result(path: Path, payload: dict) -> None:
    """Write a result file atomically: a reader never sees half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"\nwritten to {path}")
