"""Where does a training step spend its time? torch.profiler over amptrain's step and a plain loop.

Both train the same seeded GPT on the same batches for `--steps` steps (after warm-up) under
`torch.profiler`; the table shows, per operator, calls and self CPU time in each, so extra
work in amptrain's step (casts, fills, copies) stands out next to the plain loop's.

    python benchmarks/profile_step.py [--precision fp32] [--steps 8] [--ops aten::fill_,aten::copy_]
    python benchmarks/profile_step.py --quick      # the tiny job: does it run?

A diagnostic: it prints its table and writes no result file (no figure in the docs comes from it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import peers_arms  # noqa: E402


def profiled(arm: str, job: peers_arms.Job, precision: str) -> dict[str, tuple[int, float]]:
    """{op: (calls, self CPU ms)} of one run of `arm`, after an unprofiled warm-up run."""
    peers_arms.ARMS[arm](peers_arms.JOBS["quick"], precision)  # load kernels, allocator, caches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        peers_arms.ARMS[arm](job, precision)
    return {e.key: (e.count, e.self_cpu_time_total / 1000) for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", choices=sorted(peers_arms.JOBS), default="gpt")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--arms", default="plain,amptrain")
    parser.add_argument("--ops", default="", help="comma-separated ops to show (default: top 25)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="the tiny job: does it run?")
    args = parser.parse_args()
    if args.quick:
        args.job, args.steps = "quick", 3
    job = peers_arms.JOBS[args.job]
    job = type(job)(**{**job.__dict__, "steps": args.steps})
    arms = args.arms.split(",")
    stats = {arm: profiled(arm, job, args.precision) for arm in arms}

    def busiest(op: str) -> float:
        return max(s.get(op, (0, 0))[1] for s in stats.values())

    everything = {op for s in stats.values() for op in s}
    ops = args.ops.split(",") if args.ops else sorted(everything, key=busiest, reverse=True)
    ops = ops[: args.top]
    print(f"{args.steps} steps of {job.name} in {args.precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'op':<44}" + "".join(f"{arm + ' calls':>18}{arm + ' ms':>16}" for arm in arms))
    for op in ops:
        cells = "".join(
            f"{stats[a].get(op, (0, 0))[0]:>18}{stats[a].get(op, (0, 0))[1]:>16.1f}" for a in arms
        )
        print(f"{op[:43]:<44}{cells}")


if __name__ == "__main__":
    main()
