"""Peak memory of the next-token loss (forward + backward) at a large vocabulary.

The plain expression, `F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ...)`, against
amptrain's chunked loss (`amptrain.losses`), on bf16 logits `[B, T, V]` that require grad,
as a language model's head produces them. Each variant runs in isolation
(`amptrain.hardware.measure_memory`: a forked worker on CPU, the allocator's peak on CUDA);
the figure is the increment over the logits that already exist, i.e. what the loss adds.

    python benchmarks/loss_memory.py [--vocab 50257] [--batch 4] [--context 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from amptrain.hardware import measure_memory
from amptrain.losses import next_token_cross_entropy


def plain(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    flat = logits[:, :-1].float().reshape(-1, logits.size(-1))
    return F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (args.batch, args.context, args.vocab)
    logits = torch.randn(shape, device=device).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, args.vocab, shape[:2], device=device)

    def run(loss_fn):
        def work() -> None:
            loss_fn(logits, ids).backward()
            logits.grad = None

        return work

    logits_mb = logits.numel() * logits.element_size() / 2**20
    print(f"bf16 logits {list(shape)}: {logits_mb:,.0f} MB; memory the loss adds (median of "
          f"{args.repeats}, min-max):")  # fmt: skip
    results = {}
    for name, fn in (
        ("F.cross_entropy on .float()", plain),
        ("amptrain chunked", next_token_cross_entropy),
    ):
        increments = [measure_memory(device, run(fn))[1] for _ in range(args.repeats)]
        results[name] = statistics.median(increments)
        lo, hi = min(increments), max(increments)
        print(f"  {name:<30}{results[name]:>10,.0f} MB ({lo:,.0f}-{hi:,.0f})")
    plain_mb, ours_mb = results.values()
    print(f"  chunked / plain: {ours_mb / plain_mb:.2f} ({plain_mb - ours_mb:,.0f} MB less; "
          f"the gradient itself is {logits_mb:,.0f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
