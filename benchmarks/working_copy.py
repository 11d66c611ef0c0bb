"""A bf16 working copy of the weights against autocast's per-forward casts, in a plain loop.

Autocast casts every fp32 weight to bf16 in every forward (and the backward casts the
gradients back). A working copy keeps fp32 master weights, updated by the optimizer, and a
bf16 copy of them refreshed once per optimizer step; the forward and backward run on the copy
(with fp32 LayerNorm/softmax statistics left to the bf16 kernels, which is where the numbers
can differ), and the bf16 gradients are accumulated into the fp32 masters. Both arms train
the same seeded GPT on the same tokens. Rounds are interleaved (the order of the arms rotates
each round); per arm: median tokens/s over rounds, min-max and spread, `rounds.ratio` to
autocast (ratio of medians, per-round min-max, a verdict only where 5 rounds or more agree and
no spread exceeds 10 %), and the loss
of the last step, the working copy's relative to autocast's (the bar: within 1 %). amptrain
does not build the working copy: adopt it only where this shows it faster and within the
bar, on a CPU with native bf16 (AMX/AVX512-BF16) or a GPU.

    python benchmarks/working_copy.py [--rounds 5] [--steps 30] [--warmup 5]
    python benchmarks/working_copy.py --quick      # tiny and short: does it run?

Each run writes a new results/working-copy-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from amptrain.models import GPTConfig, TinyGPT

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402
from rounds import compare, interleave, parse_rounds, round_options, table  # noqa: E402


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)
    )


def train(args: argparse.Namespace, working_copy: bool) -> tuple[list[float], float]:
    """Step times and the last step's loss of one arm."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.width,
                    n_head=4, block_size=args.context)  # fmt: skip
    master = TinyGPT(cfg)
    optimizer = torch.optim.AdamW(master.parameters(), lr=1e-3, fused=True)
    copy_model = copy.deepcopy(master).to(torch.bfloat16) if working_copy else None
    rows = torch.randint(0, args.vocab, (args.steps * args.batch, args.context),
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
    times, loss = [], float("nan")
    for step in range(args.steps):
        ids = rows[step * args.batch : (step + 1) * args.batch]
        start = time.perf_counter()
        if copy_model is None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = _loss(master(ids), ids)
            out.backward()
        else:
            out = _loss(copy_model(ids), ids)
            out.backward()
            for p, w in zip(master.parameters(), copy_model.parameters()):
                p.grad = w.grad.float()  # fp32 gradients for the fp32 masters
                w.grad = None
        torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if copy_model is not None:
            with torch.no_grad():  # the copy refreshed once per optimizer step
                for p, w in zip(master.parameters(), copy_model.parameters()):
                    w.copy_(p)
        times.append(time.perf_counter() - start)
        loss = out.item()
    return times[args.warmup :], loss


def run(args: argparse.Namespace, working_copy: bool) -> dict:
    """One run of one arm: median tokens/s over the timed steps and the last step's loss."""
    times, loss = train(args, working_copy)
    return {"tokens_per_s": args.batch * (args.context - 1) / statistics.median(times),
            "loss": loss}  # fmt: skip


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    round_options(parser, steps=30)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parse_rounds(parser)
    if args.quick:
        args.width, args.layers, args.context, args.batch = 32, 2, 16, 2
    return args


def main() -> None:
    args = parse()
    meta = provenance.start("working_copy")
    runs = interleave({"autocast": lambda: run(args, False),
                       "working copy": lambda: run(args, True)}, args.rounds)  # fmt: skip
    rows = compare(runs, reference="autocast")
    rel = rows[1]["loss_vs_reference"]
    meta.update({"shape": {k: getattr(args, k) for k in
                           ("steps", "warmup", "vocab", "width", "layers", "context", "batch")},
                 "rounds": args.rounds, "loss_within_1_percent": abs(rel) <= 0.01})  # fmt: skip
    machine = meta["machine"]
    print(f"\n{machine['cpu']}, {machine['threads']} threads, torch {meta['torch']}\n")
    print(table(rows))
    print(
        f"\nloss within 1 %: {'yes' if abs(rel) <= 0.01 else 'NO'} ({rel:+.2%}). Times need "
        "a quiet machine; they mean nothing where bf16 is emulated (no AMX/AVX512-BF16)"
    )
    out = args.out or provenance.result_file("working-copy", args.quick)
    provenance.write(out, meta, {"results": rows, "raw": runs})


if __name__ == "__main__":
    main()
