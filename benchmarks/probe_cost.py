"""What does the capability probe cost, and how steady are its figures and decisions?

Runs the probe `--runs` times from scratch (the process cache cleared each time) at the
current thread count and reports, per precision, the median TFLOP/s with its range, the
median wall time of a whole probe with its range, and how often each decision (`auto`,
emulated precisions) came out the same. The probe times a CPU's matmuls by one thread's CPU
time, so its figures hold on a loaded machine (`tests/test_gpu_decisions.py` checks the
decisions there); the wall time of a whole probe does not, so run it alone to quote that.

    python benchmarks/probe_cost.py [--runs 9] [--threads N] [--out FILE]
    python benchmarks/probe_cost.py --quick        # two probes: does it run?

Each run writes a new results/probe-cost-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import torch

from amptrain import capability
from amptrain.precision import auto_choice

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="two probes: does it run?")
    parser.add_argument("--out", type=Path, default=None, help="default: a new results/ file")
    args = parser.parse_args()
    if args.quick:
        args.runs = 2
    torch.set_num_threads(args.threads)
    meta = provenance.start("probe_cost")
    cpu = torch.device("cpu")
    tables = []
    for _ in range(args.runs):
        capability.clear_cache()
        tables.append(capability.probe(cpu))
    decisions = collections.Counter(
        (auto_choice(t, cpu)[0], tuple(p for p in t.tflops if t.emulated(p))) for t in tables
    )
    result = {
        "runs": args.runs,
        "probe_seconds": spread([t.seconds for t in tables]),
        "tflops": {p: spread([t.tflops[p] for t in tables]) for p in tables[0].tflops},
        "decisions (auto, emulated): runs": {str(k): v for k, v in decisions.items()},
    }
    print(json.dumps(result, indent=2))
    provenance.write(args.out or provenance.result_file("probe-cost", args.quick), meta, result)


if __name__ == "__main__":
    main()
