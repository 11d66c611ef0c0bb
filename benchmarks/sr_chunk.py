"""How many elements should amptrain's stochastic-rounding AdamW update at a time?

`StochasticAdamW` steps a tensor in chunks of whole rows (`stochastic_round.CHUNK`): its fp32
temporaries (the gradient, both moments, the weight, the random bits) are one chunk's, not
the tensor's. This times `optimizer.step()` on the matrices of two GPT-2-small blocks in bf16
(4 x 768 x 768, 2 x 3072 x 768 and 2 x 768 x 3072 each: 14 M parameters) with bf16 and 8-bit
moments, for chunk sizes from 2**15 elements to a whole tensor, in interleaved rounds, and
reports steps/s and each size against the whole tensor (`rounds.ratio`).

    python benchmarks/sr_chunk.py [--rounds 5] [--steps 12]
    python benchmarks/sr_chunk.py --quick        # does it run?

Each run writes a new results/sr-chunk-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.
Run it alone.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from amptrain import stochastic_round
from amptrain.stochastic_round import StochasticAdamW

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402
import rounds  # noqa: E402

SIZES = {"2^15": 1 << 15, "2^16": 1 << 16, "2^17": 1 << 17, "2^18": 1 << 18, "2^20": 1 << 20,
         "whole": 1 << 40}  # fmt: skip
SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)] * 2


def arm(optimizer: StochasticAdamW, chunk: int, steps: int, warmup: int) -> dict:
    """Steps/s of `steps` optimizer steps with `chunk`, the first `warmup` left out."""
    stochastic_round.CHUNK["cpu"] = chunk
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"steps_per_s": 1 / statistics.median(times[warmup:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    rounds.round_options(parser, steps=12)
    parser.set_defaults(warmup=2)
    args = rounds.parse_rounds(parser)
    meta = provenance.start("sr_chunk")
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape).bfloat16() * 0.02) for shape in SHAPES * 2]
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    result = {"parameters": sum(p.numel() for p in params), "moments": {}}
    for moments in ("bf16", "8bit"):
        optimizer = StochasticAdamW(params, lr=1e-5, moments=moments)
        arms = {name: functools.partial(arm, optimizer, size, args.steps, args.warmup)
                for name, size in SIZES.items()}  # fmt: skip
        runs = rounds.interleave(arms, args.rounds)
        base = [r["steps_per_s"] for r in runs["whole"]]
        quiet = rounds.summary(base)["spread"] <= rounds.WIDE_SPREAD
        rows = {}
        for name, results in runs.items():
            rates = [r["steps_per_s"] for r in results]
            spread = rounds.summary(rates)["spread"]
            calm = quiet and spread <= rounds.WIDE_SPREAD
            rows[name] = {"steps_per_s_median": statistics.median(rates), "spread": spread,
                          "vs_whole": rounds.ratio(rates, base, calm)}  # fmt: skip
        result["moments"][moments] = rows
        print(f"\n{moments} moments: | chunk | steps/s | x whole (rounds) | verdict |")
        for name, row in rows.items():
            pair = row["vs_whole"]
            print(f"| {name} | {row['steps_per_s_median']:.2f} | {pair['ratio_of_medians']:.2f} "
                  f"({pair['ratio_range'][0]:.2f}-{pair['ratio_range'][1]:.2f}) | "
                  f"{pair['verdict']} |")  # fmt: skip
    provenance.write(args.out or provenance.result_file("sr-chunk", args.quick), meta, result)


if __name__ == "__main__":
    main()
