"""What each memory lever saves, and what it costs in speed: each configuration in a fresh process.

(a) A parameter-bound job, for bytes a parameter: a 12 x 768 GPT (tiny-gpt's code, about 85 M
parameters with the 256-token byte vocabulary), batch 1, context 128, under:

- `fp32`: fp32 weights, gradients and AdamW moments (16 bytes a parameter);
- `bf16 autocast`: the same state, a bf16 forward;
- `bf16 autocast + 8-bit state`: `optimizer_state="8bit"` (bitsandbytes' blockwise moments);
- `bf16-true, Kahan`: bf16 matrices, gradients and moments, Kahan-compensated updates;
- `bf16-true, SR`: the same with stochastically rounded updates and no buffer;
- `bf16-true, SR + 8-bit state`: and the moments in 8-bit blocks.

(b) An activation-bound job, for activation checkpointing: tiny-gpt (4 x 128) at batch 32,
context 512, fp32, under `activation_checkpointing` none, full, every:2 and selective.

Each configuration runs `amptrain.fit` for `--steps` steps in its own process, the first
`--warmup` untimed, in interleaved rounds. Figures: peak memory (the process's peak RSS while
training, above the idle process before the model was built) and tokens/s; per job, each
configuration against the first (peak memory ratio, and the speed ratio of medians with its
per-round min-max, `rounds.ratio`).

(c) `quality`: the built-in model fine-tuned `--quality-steps` steps on the built-in corpus in
each configuration, at the default lr and at 1e-5 (`levers_quality.py`).

(d) `largest`: the largest GPT of one shape family whose full fine-tuning step fits
`--budget-gib` (16), per configuration (`levers_largest.py`).

    python benchmarks/memory_levers.py                       # all four jobs
    python benchmarks/memory_levers.py --jobs quality,largest
    python benchmarks/memory_levers.py --quick               # tiny: does it run?
    python benchmarks/memory_levers.py --jobs parameter-bound --rounds 5 \
        --configs "bf16 autocast;bf16-true, Kahan"           # a speed verdict: 5 rounds

Each run writes a new results/memory-levers-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.
Run it alone: other jobs move the speed figures (the memory ones hold).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fresh  # noqa: E402
import levers_largest  # noqa: E402
import levers_quality  # noqa: E402
import provenance  # noqa: E402
import rounds  # noqa: E402

EXTRA_JOBS = ("quality", "largest")

JOBS = {
    "parameter-bound": {
        "shape": dict(n_layer=12, n_embd=768, n_head=12), "batch": 1, "context": 128,
        "configs": {"fp32": ("fp32", {}), "bf16 autocast": ("bf16", {}),
                    "bf16 autocast + 8-bit state": ("bf16", {"optimizer_state": "8bit"}),
                    "bf16-true, Kahan": ("bf16-true", {}),
                    "bf16-true, SR": ("bf16-true", {"compensation": "sr"}),
                    "bf16-true, SR + 8-bit state": ("bf16-true", {"compensation": "sr",
                                                                  "optimizer_state": "8bit"})},
    },
    "activation-bound": {
        "shape": dict(n_layer=4, n_embd=128, n_head=4), "batch": 32, "context": 512,
        "configs": {f"checkpointing {m}": ("fp32", {"activation_checkpointing": m})
                    for m in ("none", "full", "every:2", "selective")},
    },
}  # fmt: skip
QUICK_SHAPE = dict(n_layer=2, n_embd=64, n_head=2)


def worker(job: str, config: str, steps: int, warmup: int, quick: bool) -> dict:
    """One configuration of one job in this (fresh) process: its figures."""
    import amptrain
    from amptrain.models import GPTConfig, TinyGPT

    spec = JOBS[job]
    precision, extra = spec["configs"][config]
    batch, context = (4, 64) if quick else (spec["batch"], spec["context"])
    idle = fresh.idle_mb()
    torch.manual_seed(0)
    shape = QUICK_SHAPE if quick else spec["shape"]
    model = TinyGPT(GPTConfig(vocab_size=256, block_size=context, **shape))
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (batch * steps, context), generator=gen)
    val = torch.randint(0, 256, (batch, context), generator=gen)
    clock = fresh.Clock()
    result = amptrain.fit(model, train, val, precision=precision, max_steps=steps,
                          batch_size=batch, eval_every=steps, eval_batches=1, log_every=1,
                          compile=False, callbacks=[clock], allocator="system",
                          **extra)  # fmt: skip
    step_s = clock.step_s(warmup)
    peak = result.peak_mem_mb - idle
    return {"parameters": params, "peak_mb": peak, "bytes_per_parameter": peak * 2**20 / params,
            "tokens_per_s": batch * (context - 1) / step_s,
            "loss": result.final_val_loss}  # fmt: skip


def run_worker(job: str, config: str, args: argparse.Namespace) -> dict:
    return fresh.run(__file__, "--worker", job, config, "--steps", str(args.steps), "--warmup",
                     str(args.warmup), *(["--quick"] if args.quick else []))  # fmt: skip


def measure_job(job: str, args: argparse.Namespace) -> dict:
    configs = list(JOBS[job]["configs"])[: 2 if args.quick else None]  # quick: does it run?
    if args.configs:  # the first named is the reference the others are compared with
        configs = [c for c in args.configs.split(";") if c in JOBS[job]["configs"]]
        if not configs:
            sys.exit(
                f"--configs {args.configs!r} names none of {job}'s: {list(JOBS[job]['configs'])}"
            )
    runs = rounds.interleave({c: (lambda c=c: run_worker(job, c, args)) for c in configs},
                             args.rounds)  # fmt: skip
    base = runs[configs[0]]
    rows = {}
    for config, results in runs.items():
        rates = [r["tokens_per_s"] for r in results]
        quiet = (
            max(
                rounds.summary(rates)["spread"],
                rounds.summary([r["tokens_per_s"] for r in base])["spread"],
            )
            <= rounds.WIDE_SPREAD
        )
        rows[config] = {
            "parameters": results[0]["parameters"],
            "peak_mb": statistics.median(r["peak_mb"] for r in results),
            "peak_mb_range": [min(r["peak_mb"] for r in results),
                              max(r["peak_mb"] for r in results)],
            "bytes_per_parameter": statistics.median(r["bytes_per_parameter"] for r in results),
            **rounds.summary(rates),
            "speed_vs_first": rounds.ratio(rates, [r["tokens_per_s"] for r in base], quiet),
            "loss": statistics.median(r["loss"] for r in results),
        }  # fmt: skip
        rows[config]["peak_vs_first"] = rows[config]["peak_mb"] / statistics.median(
            r["peak_mb"] for r in base
        )
    print(
        f"\n{job}: | configuration | peak MB above idle (x first) | bytes a parameter | "
        "tokens/s median (min-max) | speed x first (rounds) |"
    )
    for config, r in rows.items():
        pair = r["speed_vs_first"]
        print(
            f"| {config} | {r['peak_mb']:,.0f} ({r['peak_vs_first']:.2f}x) | "
            f"{r['bytes_per_parameter']:.1f} | {r['tokens_per_s_median']:,.0f} "
            f"({r['tokens_per_s_range'][0]:,.0f}-{r['tokens_per_s_range'][1]:,.0f}) | "
            f"{pair['ratio_of_medians']:.2f} ({pair['ratio_range'][0]:.2f}-"
            f"{pair['ratio_range'][1]:.2f}): {pair['verdict']} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rounds.round_options(parser, steps=8)
    parser.add_argument("--jobs", default=",".join([*JOBS, *EXTRA_JOBS]), help="comma-separated")
    parser.add_argument(
        "--configs",
        help="';'-separated configurations of the timed jobs, "
        "the first the reference (default: all, bf16 autocast's job order)",
    )
    parser.add_argument("--quality-steps", type=int, default=600)
    parser.add_argument(
        "--lrs", default="1e-3,1e-5", help="quality: the default lr, and a small one"
    )
    parser.add_argument("--budget-gib", type=float, default=16.0, help="largest: the budget")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--largest-worker", nargs=3, help=argparse.SUPPRESS)
    parser.set_defaults(rounds=3)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.quick)))
        return
    if args.largest_worker:
        config, k, budget = args.largest_worker
        print(json.dumps(levers_largest.worker(config, int(k), float(budget))))
        return
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 4, 1
        args.quality_steps, args.budget_gib = 20, 0.25
    meta = provenance.start("memory_levers")
    payload = {"jobs": {}, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
               "shapes": {job: ("quick" if args.quick else spec["shape"], spec["batch"],
                                spec["context"]) for job, spec in JOBS.items()}}  # fmt: skip
    for job in args.jobs.split(","):
        if job == "quality":
            lrs = args.lrs.split(",")
            payload["jobs"][job] = levers_quality.measure(args.quality_steps, lrs, args.quick)
        elif job == "largest":
            payload["jobs"][job] = levers_largest.measure(__file__, args.budget_gib, args.quick)
        else:
            payload["jobs"][job] = measure_job(job, args)
    out = args.out or provenance.result_file("memory-levers", args.quick)
    provenance.write(out, meta, payload)
    print(f"result: {out}")


if __name__ == "__main__":
    main()
