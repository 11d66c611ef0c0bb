"""The step's epilogue compiled or eager, in the expert's loop: is compiling it faster?

Both arms are `peers_arms.expert`, the loop a performance-minded user writes (the model and the
loss compiled as one function by `torch.compile`), on the peers' GPT job. They differ only in
the epilogue after the backward: (a) `eager` clips the gradients' norm with
`clip_grad_norm_` and steps a fused AdamW; (b) `compiled` runs the same clipping and step
inside one `torch.compile`d function over a foreach AdamW, torch's "compiling the optimizer"
recipe (dynamo makes it capturable on CUDA). amptrain compiles the epilogue only if this
measures it faster: run it alone, on a quiet machine.

Rounds are interleaved in one process (the order of the arms rotates each round; dynamo's
caches are reset before every run, so each compiles as a fresh process would, served by
inductor's on-disk cache: the point is each arm's steady speed, not its compile time). Per
arm: median tokens/s over rounds, min-max and spread, `rounds.ratio` to the eager epilogue
(ratio of medians, per-round min-max, a verdict only where 5 rounds or more agree and no spread
exceeds 10 %), and the held-out loss after the same steps.

    python benchmarks/epilogue.py [--rounds 5] [--precision bf16] [--steps 30] [--warmup 5]
    python benchmarks/epilogue.py --quick      # tiny and short: does it run?

Each run writes a new results/epilogue-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402
from peers_arms import JOBS, Job, expert, heldout_loss  # noqa: E402
from rounds import compare, interleave, parse_rounds, round_options, table  # noqa: E402


def run(job: Job, precision: str, warmup: int, compiled_epilogue: bool) -> dict:
    """One run of one arm: median tokens/s over the timed steps and the held-out loss."""
    torch._dynamo.reset()  # every run compiles afresh, as a new process would
    stamps, model = expert(job, precision, compiled_epilogue=compiled_epilogue)
    step_times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    return {"tokens_per_s": job.tokens_per_step / statistics.median(step_times),
            "loss": heldout_loss(model, job)}  # fmt: skip


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    round_options(parser, steps=JOBS["gpt"].steps)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--width", type=int, default=JOBS["gpt"].n_embd)
    parser.add_argument("--layers", type=int, default=JOBS["gpt"].n_layer)
    args = parse_rounds(parser)
    if args.quick:
        args.width, args.layers = JOBS["quick"].n_embd, JOBS["quick"].n_layer
    return args


def main() -> None:
    args = parse()
    job = dataclasses.replace(JOBS["gpt"], steps=args.steps, n_embd=args.width,
                              n_layer=args.layers)  # fmt: skip
    meta = provenance.start("epilogue")
    arms = {
        "eager": lambda: run(job, args.precision, args.warmup, compiled_epilogue=False),
        "compiled": lambda: run(job, args.precision, args.warmup, compiled_epilogue=True),
    }
    runs = interleave(arms, args.rounds)
    rows = compare(runs, reference="eager")
    meta.update({"job": dataclasses.asdict(job), "precision": args.precision,
                 "rounds": args.rounds, "warmup": args.warmup})  # fmt: skip
    print(
        f"\n{meta['machine']['cpu']}, {meta['machine']['threads']} threads, "
        f"torch {meta['torch']}, {args.precision}, d{job.n_embd} x {job.n_layer} layers\n"
    )
    print(table(rows))
    out = args.out or provenance.result_file("epilogue", args.quick)
    provenance.write(out, meta, {"results": rows, "raw": runs})


if __name__ == "__main__":
    main()
