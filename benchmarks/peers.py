"""amptrain against a plain PyTorch loop and the peers, on one job, one process per run.

Arms (see `peers_arms.py`): `plain` (hand-written loop, torch's default AdamW,
`F.cross_entropy` on `.float()` logits), `expert` (nanoGPT's recipe: the model and the loss
compiled as one function by `torch.compile`, fused AdamW), `amptrain` (its defaults, told the
run is 2,000 steps long and stopped after the job's steps), Lightning's Trainer,
Accelerate, the transformers Trainer (its own default optimizer), and with `--ablation` the
plain loop with each of amptrain's levers alone, amptrain with each lever off, and amptrain
with `compile=True` (its compile time is outside the timed steps). Every run
is a fresh process with an inductor cache and an amptrain cache of its own (no compiled code or
measured decision carries from one run to the next); rounds are interleaved and the order of the
arms rotates each round, so machine drift hits all alike. Per arm and precision: median
tokens/s over rounds with min-max and the spread ((max - min) / median), the ratios to the plain
loop and to the expert's loop (`rounds.ratio`: the ratio of medians, the min-max of the
per-round ratios, a verdict only where 5 rounds or more all agree), peak RSS of the process, and
the held-out loss after the same steps (measured the same way for every arm). An arm whose
spread exceeds `WIDE_SPREAD` makes its verdicts inconclusive.

    pip install -e '.[bench]' -c constraints.txt
    python benchmarks/peers.py --quick                 # a few seconds per arm: does it run?
    python benchmarks/peers.py --rounds 5 --ablation   # the real measurement, on a quiet machine
    python benchmarks/peers.py --job gpt-v128k --arms plain,expert,amptrain --precisions fp32

Each run writes a new file with its provenance (`provenance.py`):
benchmarks/results/peers-<job>-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402
from peers_arms import ABLATION, ARMS, JOBS, PEERS, heldout_loss  # noqa: E402
from rounds import MIN_ROUNDS, WIDE_SPREAD, ratio, summary  # noqa: E402

from amptrain import hardware  # noqa: E402

_NEEDS = {"lightning": "lightning", "accelerate": "accelerate", "transformers": "transformers"}


def worker(arm: str, job_name: str, precision: str, steps: int, warmup: int) -> dict:
    """Run one arm in this process and return its figures."""
    job = dataclasses.replace(JOBS[job_name], steps=steps)
    stamps, model = ARMS[arm](job, precision)
    step_times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    return {
        "tokens_per_s": job.tokens_per_step / statistics.median(step_times),
        "fast_tokens_per_s": job.tokens_per_step / fast_step(step_times),
        "peak_rss_mb": hardware.peak_memory_mb(torch.device("cpu"))[0],  # the process's
        "heldout_loss": heldout_loss(model, job),
        "steps": len(stamps),
    }


def fast_step(step_times: list[float]) -> float:
    """The step time of the fastest tenth of steps (the 10th percentile).

    Other jobs on a shared machine only ever add time to a step, so the fast steps show an
    arm's own speed more steadily than the median does; both are reported.
    """
    ordered = sorted(step_times)
    return ordered[len(ordered) // 10]


def _spawn(arm: str, job: str, precision: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", arm, "--job", job, "--precisions", precision,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="amptrain-peers-") as caches:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor",
               "AMPTRAIN_CACHE_DIR": f"{caches}/amptrain"}  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """One row per (precision, arm): medians and spread, and ratios to the plain loop."""
    rows = []
    for (precision, arm), results in runs.items():
        ok = [r for r in results if "error" in r]
        good = [r for r in results if "error" not in r]
        if not good:
            rows.append({"precision": precision, "arm": arm, "error": ok[0]["error"]})
            continue
        rows.append({
            "precision": precision, "arm": arm,
            **summary([r["tokens_per_s"] for r in good]),
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in good),
            "heldout_loss": statistics.median(r["heldout_loss"] for r in good),
        })  # fmt: skip
    for ref in ("plain", "expert"):
        bases = {r["precision"]: r for r in rows if r["arm"] == ref and "error" not in r}
        for row in rows:
            base = bases.get(row["precision"])
            if base and "error" not in row and row is not base:
                mine, theirs = runs[row["precision"], row["arm"]], runs[row["precision"], ref]
                quiet = max(row["spread"], base["spread"]) <= WIDE_SPREAD
                for prefix, key in (("", "tokens_per_s"), ("fast_", "fast_tokens_per_s")):
                    found = ratio_by_round(mine, theirs, key, quiet)
                    if found:
                        row[f"{prefix}vs_{ref}"] = found
            if ref == "plain" and base and "error" not in row:
                row["loss_vs_plain"] = row["heldout_loss"] / base["heldout_loss"] - 1
                row["rss_vs_plain"] = row["peak_rss_mb_median"] / base["peak_rss_mb_median"]
    return rows


def ratio_by_round(
    arm_runs: list[dict], ref_runs: list[dict], key: str, quiet: bool
) -> dict | None:
    """`rounds.ratio` of figure `key` over the rounds where both arms measured it, or None."""
    pairs = [(r[key], b[key]) for r, b in zip(arm_runs, ref_runs) if key in r and key in b]
    if not pairs:
        return None
    mine, theirs = zip(*pairs, strict=True)
    return ratio(list(mine), list(theirs), quiet)


def wide_spreads(rows: list[dict]) -> list[str]:
    """The arms whose spread over rounds is too wide for their ratios to be trusted."""
    return [f"{r['precision']}/{r['arm']} ({r['spread']:.0%})" for r in rows
            if r.get("spread", 0) > WIDE_SPREAD]  # fmt: skip


def table(rows: list[dict]) -> str:
    """A Markdown table, the one the docs show: per reference arm (plain, expert), `rounds.ratio`
    of tokens/s (the ratio of medians, the per-round min-max, the verdict), then the same ratio on
    the fast steps (`fast_step`)."""
    out = ["| precision | arm | tokens/s median (min-max) | spread | x plain (rounds) "
           "| vs plain | x expert (rounds) | vs expert | fast steps: x plain "
           "| fast steps: x expert | peak RSS MB | held-out loss (vs plain) |",
           "|---|---|---|---:|---|---|---|---|---|---|---:|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            out.append(f"| {r['precision']} | {r['arm']} | failed: {r['error'][:80]} |" + " |" * 9)
            continue
        lo, hi = r["tokens_per_s_range"]
        cells = []
        for ref in ("plain", "expert"):
            pair = r.get(f"vs_{ref}")
            mine = r["arm"] == ref
            cells += ([_ratio(pair), pair["verdict"]] if pair
                      else ["1.00" if mine else "", "reference" if mine else ""])  # fmt: skip
        for ref in ("plain", "expert"):
            fast = r.get(f"fast_vs_{ref}")
            cells.append(f"{_ratio(fast)}, {fast['verdict']}" if fast
                         else "reference" if r["arm"] == ref else "")  # fmt: skip
        loss = r.get("loss_vs_plain", float("nan"))
        out.append(
            f"| {r['precision']} | {r['arm']} "
            f"| {r['tokens_per_s_median']:,.0f} ({lo:,.0f}-{hi:,.0f}) | {r['spread']:.0%} "
            f"| {' | '.join(cells)} | {r['peak_rss_mb_median']:,.0f} "
            f"| {r['heldout_loss']:.4f} ({loss:+.1%}) |"
        )
    return "\n".join(out)


def _ratio(pair: dict) -> str:
    lo, hi = pair["ratio_range"]
    return f"{pair['ratio_of_medians']:.2f} ({lo:.2f}-{hi:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", choices=sorted(JOBS), default="gpt")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--steps", type=int, default=None, help="default: the job's")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--arms", default=",".join(PEERS), help=f"of {', '.join(ARMS)}")
    parser.add_argument("--ablation", action="store_true", help="add each lever on and off")
    parser.add_argument("--quick", action="store_true", help="the tiny job, 8 steps, 1 round")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/...")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.job, args.rounds, args.warmup = "quick", 1, 2
    args.steps = args.steps or JOBS[args.job].steps
    if args.steps < args.warmup + 3:
        parser.error(
            f"--steps {args.steps} leaves under 2 timed steps after --warmup {args.warmup}"
        )
    if args.worker:
        print(json.dumps(worker(args.worker, args.job, args.precisions, args.steps, args.warmup)))
        return
    arms = args.arms.split(",") + (list(ABLATION) if args.ablation else [])
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    missing = [a for a in arms if a in _NEEDS and importlib.util.find_spec(_NEEDS[a]) is None]
    if missing:
        print(f"skipping {missing}: install them with pip install -e '.[bench]' -c constraints.txt")
        arms = [a for a in arms if a not in missing]
    meta = provenance.start("peers")
    runs: dict[tuple[str, str], list[dict]] = {
        (p, a): [] for p in args.precisions.split(",") for a in arms
    }
    for round_ in range(args.rounds):
        order = arms[round_ % len(arms) :] + arms[: round_ % len(arms)]  # rotate each round
        for precision in args.precisions.split(","):
            for arm in order:
                runs[precision, arm].append(_spawn(arm, args.job, precision, args))
                got = runs[precision, arm][-1]
                print(f"round {round_ + 1}/{args.rounds} {precision} {arm}: {got}", flush=True)
    rows = summarise(runs)
    job = dataclasses.replace(JOBS[args.job], steps=args.steps)
    meta.update(
        {
            "job": dataclasses.asdict(job),
            "rounds": args.rounds,
            "warmup": args.warmup,
            "quick": args.quick,
            "caches": "a fresh inductor and amptrain cache per run",
        }
    )
    machine = meta["machine"]
    print(f"\n{machine['cpu']} ({machine['isa']}), {machine['threads']} threads, "
          f"torch {meta['torch']}, job {args.job}\n")  # fmt: skip
    print(table(rows))
    wide = wide_spreads(rows)
    meta["wide_spread"] = wide
    if wide:
        print(f"\nSPREAD TOO WIDE (over {WIDE_SPREAD:.0%} of the median): {', '.join(wide)}; "
              "their ratios are not to be trusted: rerun alone on a quiet machine")  # fmt: skip
    raw = {f"{p}/{a}": r for (p, a), r in runs.items()}
    out = args.out or provenance.result_file(f"peers-{args.job}", args.quick)
    provenance.write(out, meta, {"results": rows, "raw": raw})


if __name__ == "__main__":
    main()
