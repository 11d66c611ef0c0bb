"""amptrain vs a plain loop: `amptrain.fit` against a hand-written PyTorch loop.

Both runners train the same model (fresh, same seed), on the same batches, in the same
precision, with the same AdamW hyperparameters, clipping and learning rate. The plain loop is
what a person writes with torch's defaults: the default (for-loop on CPU) AdamW kernel and
`F.cross_entropy` on `.float()` logits, with no scheduler, metrics, sinks or non-finite
policy. amptrain runs with its defaults (fused AdamW, chunked loss, measured attention), so the
ratio is its bookkeeping cost and its kernels together; `benchmarks/peers.py --ablation`
separates the two. Runs are interleaved (bare/fit, then
fit/bare the next round) so machine drift hits both alike. Warm-up steps are excluded; the
figure is tokens/s at the median step time of the timed steps, stamped at the end of every
step (for `fit`, from a callback, so its per-step bookkeeping is inside the measurement).
The ratio is amptrain over plain as `rounds.ratio` gives it: the ratio of the medians, the
min-max of the per-round ratios, and a verdict only where 5 rounds or more all agree.

    python benchmarks/loop_overhead.py [--rounds 9] [--steps 25] [--warmup 5] [--out FILE]
    python benchmarks/loop_overhead.py --quick     # tiny and short: does it run?

Each run writes a new results/loop-overhead-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import amptrain
from amptrain import data
from amptrain.config import FitOptions
from amptrain.models import GPTConfig, TinyGPT
from amptrain.optim import make_optimizer
from amptrain.precision import cpu_bf16_features, resolve

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402
from rounds import WIDE_SPREAD, parse_rounds, ratio, round_options, summary  # noqa: E402


class Stamp(amptrain.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, state, metrics) -> None:
        self.times.append(time.perf_counter())


def bare_loop(model, blocks, precision, opts, steps):
    """The loop a person writes by hand: autocast forward, loss, backward, clip, step."""
    prec = resolve(precision, "cpu")
    optimizer = make_optimizer(model, dataclasses.replace(opts, optimizer_impl="for-loop"))
    batches = data.batches(blocks, opts.batch_size, opts.seed)
    stamps = []
    for _ in range(steps):
        x, _ = next(batches)
        with prec.autocast():
            logits = model(x)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1)
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


def fit_loop(model, blocks, precision, opts, steps):
    stamp = Stamp()
    amptrain.fit(
        model, blocks, precision=precision, callbacks=[stamp], max_steps=steps,
        batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed, warmup=0.0, min_lr_ratio=1.0,
    )  # fmt: skip
    return stamp.times


def tokens_per_s(stamps, warmup, tokens_per_step):
    """Tokens over the median step time: robust to a brief stall of a shared machine."""
    timed = stamps[warmup:]
    step_times = [b - a for a, b in zip(timed, timed[1:])]
    return tokens_per_step / statistics.median(step_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    round_options(parser, steps=25)
    parser.set_defaults(rounds=9)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parse_rounds(parser)
    # One process: `fit`'s runs share a fresh amptrain and inductor cache, kept for this run
    # only (as a user's successive runs share theirs), never the user's own.
    caches = tempfile.mkdtemp(prefix="amptrain-overhead-")
    os.environ.update(AMPTRAIN_CACHE_DIR=f"{caches}/amptrain",
                      TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor")  # fmt: skip
    cfg = GPTConfig()  # the built-in default: 4 layers x 256, context 128
    if args.quick:
        cfg = GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16)
    meta = provenance.start("loop_overhead")
    blocks = data.load("builtin", cfg.block_size)
    opts = FitOptions(batch_size=16, lr=1e-3)
    tokens_per_step = opts.batch_size * (cfg.block_size - 1)
    runners = {"bare": bare_loop, "fit": fit_loop}
    rates = {(p, r): [] for p in args.precisions.split(",") for r in runners}
    for round_ in range(args.rounds):
        order = list(runners) if round_ % 2 == 0 else list(reversed(runners))
        for precision in args.precisions.split(","):
            for name in order:
                torch.manual_seed(0)
                model = TinyGPT(cfg)
                stamps = runners[name](model, blocks, precision, opts, args.steps)
                rates[precision, name].append(tokens_per_s(stamps, args.warmup, tokens_per_step))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU bf16 features: {', '.join(cpu_bf16_features()) or 'none'}\n")  # fmt: skip
    print("| precision | plain tok/s (min-max) | amptrain tok/s (min-max) "
          "| amptrain / plain (rounds min-max) | verdict |\n|---|---|---|---|---|")  # fmt: skip
    results = []
    for precision in args.precisions.split(","):
        bare, fit = rates[precision, "bare"], rates[precision, "fit"]
        plain, mine = summary(bare), summary(fit)
        quiet = max(plain["spread"], mine["spread"]) <= WIDE_SPREAD
        row = {"precision": precision, "plain": plain, "amptrain": mine,
               "amptrain_vs_plain": ratio(fit, bare, quiet)}  # fmt: skip
        results.append(row)
        vs = row["amptrain_vs_plain"]
        lo, hi = vs["ratio_range"]
        print(f"| {precision} | {statistics.median(bare):,.0f} ({min(bare):,.0f}-{max(bare):,.0f}) "
              f"| {statistics.median(fit):,.0f} ({min(fit):,.0f}-{max(fit):,.0f}) "
              f"| {vs['ratio_of_medians']:.3f} ({lo:.3f}-{hi:.3f}) "
              f"| {vs['verdict']} |")  # fmt: skip
    meta.update({"model": dataclasses.asdict(cfg), "rounds": args.rounds, "steps": args.steps,
                 "warmup": args.warmup})  # fmt: skip
    out = args.out or provenance.result_file("loop-overhead", args.quick)
    provenance.write(out, meta, {"results": results})


if __name__ == "__main__":
    main()
