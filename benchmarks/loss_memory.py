"""Peak memory and time of a language model's head and next-token loss at several vocabularies.

From the hidden states `[B, T, d]` (fp32, as a final LayerNorm leaves them) and an fp32 head
weight `[V, d]`, forward and backward of:

- `F.cross_entropy on .float()`: the plain loop's `F.cross_entropy(head(h)[:, :-1].float()...)`;
- `amptrain unfused`: the head, then amptrain's chunked loss on its logits (`amptrain.losses`);
- `amptrain fused`: amptrain's fused head and loss (`amptrain.head_loss`), no logits built;
- `torch fused (default options)`: `F.linear_cross_entropy` with `LinearCrossEntropyOptions()`,
  torch's own chunk sizes.

Memory: each variant runs in isolation (`amptrain.hardware.measure_memory`: a forked one-thread
worker on CPU, the allocator's peak on CUDA); the figure is the increment over the hidden states
and the weight, which already exist: what the head and the loss add. Peak memory figures hold
on a loaded machine; the times do not (measure them on a quiet one). The target is the fused
loss's extra memory at most a quarter of the plain expression's at V = 128,256.

    python benchmarks/loss_memory.py                     # V = 8,192, 50,257 and 128,256
    python benchmarks/loss_memory.py --quick             # tiny: does it run?

Each run writes a new results/loss-memory-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.

The first variant must be the plain expression (the ratios are to it).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  (see main())
import torch.nn.functional as F
from torch import nn

from amptrain.hardware import measure_memory
from amptrain.head_loss import fused_next_token_loss
from amptrain.losses import next_token_cross_entropy

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402


def plain(hidden: torch.Tensor, head: nn.Linear, ids: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    flat = logits[:, :-1].float().reshape(-1, logits.size(-1))
    return F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="sum")


def unfused(hidden: torch.Tensor, head: nn.Linear, ids: torch.Tensor) -> torch.Tensor:
    return next_token_cross_entropy(head(hidden), ids)


def torch_default(hidden: torch.Tensor, head: nn.Linear, ids: torch.Tensor) -> torch.Tensor:
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    d = hidden.size(-1)
    return F.linear_cross_entropy(
        hidden.reshape(-1, d), head.weight, targets.reshape(-1), reduction="sum",
        options=nn.LinearCrossEntropyOptions(),
    )  # fmt: skip


TARGET_VOCAB = 128256
"""From this vocabulary on, the fused loss must add at most a quarter of the plain's memory."""

VARIANTS = {
    "F.cross_entropy on .float()": plain,
    "amptrain unfused": unfused,
    "amptrain fused": fused_next_token_loss,
    "torch fused (default options)": torch_default,
}


def measure(args: argparse.Namespace, vocab: int) -> dict[str, tuple[float, float]]:
    """`{variant: (extra MB, seconds per forward+backward)}` at one vocabulary."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    hidden = torch.randn(args.batch, args.context, args.width, device=device).requires_grad_()
    head = nn.Linear(args.width, vocab, bias=False, device=device)
    ids = torch.randint(0, vocab, (args.batch, args.context), device=device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    out = {}
    for name in args.variants.split(","):
        fn = VARIANTS[name]

        def work(fn=fn) -> None:
            with autocast:
                loss = fn(hidden, head, ids)
            loss.backward()
            hidden.grad = head.weight.grad = None

        mem = statistics.median(measure_memory(device, work)[1] for _ in range(args.repeats))
        work()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        out[name] = (mem, statistics.median(times))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocabs", default="8192,50257,128256")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="tiny: does it run?")
    parser.add_argument("--out", type=Path, default=None, help="default: a new results/ file")
    args = parser.parse_args()
    if args.quick:
        args.vocabs, args.batch, args.context, args.repeats = "512", 2, 32, 1
    meta = provenance.start("loss_memory")
    rows = []
    # torch's chunked op imports torch._dynamo on its first call (~100 MB of Python objects,
    # seconds, once per process); it is imported above, before the memory workers fork, so
    # the figures are the loss's own and not that one-time import.
    print(f"hidden [{args.batch}, {args.context}, {args.width}], {args.precision}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of "
          f"{args.repeats}. Memory: what head + loss add (forward + backward); time: one "
          f"forward + backward (not to be trusted on a loaded machine)")  # fmt: skip
    print("| V | variant | extra MB | vs plain | ms |\n|---:|---|---:|---:|---:|")
    for vocab in (int(v) for v in args.vocabs.split(",")):
        results = measure(args, vocab)
        plain_mb = results["F.cross_entropy on .float()"][0]
        for name, (mb, seconds) in results.items():
            rows.append({"vocab": vocab, "variant": name, "extra_mb": mb, "vs_plain": mb / plain_mb,
                         "median_s": seconds})  # fmt: skip
            print(
                f"| {vocab:,} | {name} | {mb:,.0f} | {mb / plain_mb:.2f} | {seconds * 1e3:,.0f} |"
            )
        if "amptrain fused" not in results or vocab < TARGET_VOCAB:
            continue
        fused_mb = results["amptrain fused"][0]
        verdict = "met" if fused_mb <= plain_mb / 4 else "MISSED"
        print(f"| {vocab:,} | target: fused <= plain / 4 | {fused_mb:,.0f} <= "
              f"{plain_mb / 4:,.0f} | {verdict} | |")  # fmt: skip
    meta.update({"shape": {k: getattr(args, k) for k in ("batch", "context", "width")},
                 "precision": args.precision, "repeats": args.repeats, "device": args.device,
                 "note": "extra_mb: what head + loss add over the hidden states and the weight; "
                         "median_s is not to be trusted on a loaded machine"})  # fmt: skip
    out = args.out or provenance.result_file("loss-memory", args.quick)
    provenance.write(out, meta, {"results": rows})


if __name__ == "__main__":
    main()
