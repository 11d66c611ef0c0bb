"""Peak memory per rank and tokens/s: one process, DDP x2 and FSDP x2 (gloo on CPU, NCCL on GPU).

The job is one where parameters and optimizer state dominate: a TinyGPT of 12 layers x 768
(about 85M parameters), batch 1 per process, context 128, fp32, AdamW. Each arm runs in fresh
processes (no shared allocator state). Per rank: the process's peak resident set size
(`hardware.peak_memory_mb`, never reset here, so all
the process holds: torch itself, weights, gradients, AdamW moments, activations, buffers);
per arm: the median tokens/s of all ranks together over the steps after the warm-up. The
arms share the machine's cores equally: one process gets every thread, two get half each.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
the per-block buffers FSDP gathers and frees (28 MB per block here) end up on the heap, which
is not given back to the system: the RSS then measures the allocator's retention, not the
tensors. Every arm therefore runs with the same fixed threshold (`MALLOC_MMAP_THRESHOLD_`,
1 MiB by default; `--mmap-threshold 0` leaves glibc's dynamic one, which the result records).

    python benchmarks/sharding.py --quick      # tiny model, a few steps: does it run?
    python benchmarks/sharding.py              # the measurement (memory is meaningful even
                                               # under load; timings need a quiet machine)

Each run writes a new results/sharding-<cpu>-<isa>-t<threads>-torch<version>-<time>.json with
its provenance (`provenance.py`: the load average before and after among it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402

ARMS = {"one": (1, "ddp"), "ddp": (2, "ddp"), "fsdp": (2, "fsdp")}
SIZES = {"full": dict(n_layer=12, n_embd=768, n_head=12), "quick": dict(n_layer=2, n_embd=64,
                                                                         n_head=2)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, port: int, strategy: str, args: argparse.Namespace, out: str):
    import amptrain
    from amptrain import hardware
    from amptrain.models import GPTConfig, TinyGPT

    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)  # fmt: skip
    torch.manual_seed(0)
    size = SIZES["quick" if args.quick else "full"]
    model = TinyGPT(GPTConfig(vocab_size=256, block_size=args.context, dropout=0.0, **size))
    params = sum(p.numel() for p in model.parameters())
    data = torch.randint(0, 256, (64, args.context), generator=torch.Generator().manual_seed(0))
    result = amptrain.fit(model, data, None, precision="fp32", batch_size=1, lr=1e-4,
                          max_steps=args.steps, strategy=strategy, log_every=1)  # fmt: skip
    rates = [h["perf/tokens_per_s"] for h in result.history if "perf/tokens_per_s" in h]
    peak, _ = hardware.peak_memory_mb(torch.device("cpu"))  # the process's, from its start
    figures = {"rank": rank, "peak_rss_mb": peak,
               "tokens_per_s": statistics.median(rates[args.warmup :]),
               "parameters": params, "sharding": result.fast_path["sharding"]}  # fmt: skip
    Path(f"{out}-{rank}.json").write_text(json.dumps(figures))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _worker(rank, world, port, strategy, args, out):
    _train(rank, world, port, strategy, args, out)
    os._exit(0)  # skip gloo's teardown, which occasionally aborts after the work is saved


def run_arm(arm: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Run one arm in fresh processes; its per-rank figures."""
    world, strategy = ARMS[arm]
    out = str(tmp / arm)
    mp.start_processes(_worker, args=(world, free_port(), strategy, args, out), nprocs=world,
                       start_method="spawn")  # fmt: skip
    ranks = [json.loads(Path(f"{out}-{r}.json").read_text()) for r in range(world)]
    return {
        "processes": world, "strategy": strategy, "parameters": ranks[0]["parameters"],
        "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in ranks],
        "tokens_per_s": round(ranks[0]["tokens_per_s"], 1), "sharding": ranks[0]["sharding"],
    }  # fmt: skip


def table(rows: dict[str, dict]) -> str:
    ddp = max(rows["ddp"]["peak_rss_mb_per_rank"])
    lines = ["| arm | processes | peak RSS per rank (MB) | vs DDP | tokens/s (all ranks) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for arm, row in rows.items():
        peak = max(row["peak_rss_mb_per_rank"])
        lines.append(f"| {arm} | {row['processes']} | {peak:,.0f} | {peak / ddp:.2f}x | "
                     f"{row['tokens_per_s']:,.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model: does it run?")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads shared by the processes of an arm")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/...")
    parser.add_argument("--mmap-threshold", type=int, default=1 << 20,
                        help="MALLOC_MMAP_THRESHOLD_ (bytes) for every arm; 0: glibc's "
                        "dynamic one")  # fmt: skip
    args = parser.parse_args()
    if args.mmap_threshold:  # read by glibc when each spawned process starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)

    meta = provenance.start("sharding")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {arm: run_arm(arm, args, Path(tmp)) for arm in ARMS}
    ratio = max(rows["fsdp"]["peak_rss_mb_per_rank"]) / max(rows["ddp"]["peak_rss_mb_per_rank"])
    meta.update({
        "threads_per_arm": args.threads, "model": SIZES["quick" if args.quick else "full"],
        "batch_per_process": 1, "context": args.context, "precision": "fp32",
        "steps": args.steps, "warmup": args.warmup,
        "malloc_mmap_threshold": args.mmap_threshold or "glibc dynamic",
        "fsdp_vs_ddp_peak_rss": round(ratio, 3), "target_fsdp_vs_ddp": 0.6,
    })  # fmt: skip
    print(table(rows))
    print(f"FSDP peak per rank / DDP: {ratio:.2f} (target <= 0.6)")
    provenance.write(args.out or provenance.result_file("sharding", args.quick), meta,
                     {"results": rows})  # fmt: skip


if __name__ == "__main__":
    main()
