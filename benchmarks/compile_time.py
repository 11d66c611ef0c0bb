"""Compile seconds of amptrain's compiled step: cold and warm cache, whole-model vs regional.

For each model (the built-in tiny-gpt, and the same width with 12 layers) and each way of
compiling it, a fresh process compiles the step (`amptrain.compiling.compile_loss`: forward
and loss as one graph) and times its first forward+backward (the compilation, plus one step)
and then one compiled step, beside one eager step. "whole" is the step fit compiles: forward
and loss as one graph, every layer traced; "regional" compiles the repeated block once for all
layers and the loss as its own graph, the rest of the forward eager. "cold"
runs with an empty inductor cache folder; "warm" reruns in the same folder, so inductor's
FX-graph and AOTAutograd caches are what the second run of the same model gets.

    python benchmarks/compile_time.py [--precision fp32] [--layers 4,12] [--quick] [--out FILE]

Each run writes a new results/compile-time-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.
The cold and warm runs of one size share an inductor cache on purpose (the warm run measures
that cache); each size and mode starts from an empty one.
Timings on a loaded machine are not figures: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402


def worker(layers: int, mode: str, precision: str, width: int, context: int) -> dict:
    """Run in a fresh process: compile the step once, time it, print the figures as JSON."""
    from amptrain.compiling import compile_loss, eager_loss, time_steps
    from amptrain.models import GPTConfig, TinyGPT
    from amptrain.precision import resolve

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=layers, n_embd=width, block_size=context))
    prec = resolve(precision, "cpu")
    sample = torch.randint(0, 256, (8, context))
    eager = time_steps(eager_loss(-100), model, prec, sample, _nothing, 2)[-1]
    start = time.perf_counter()
    compiled = compile_loss(model, sample, 256, -100, regional=mode == "regional")
    first, step = time_steps(compiled.fn, model, prec, sample, _nothing, 2)
    return {"compile_s": time.perf_counter() - start - step, "first_pass_s": first,
            "compiled_step_s": step, "eager_step_s": eager, **compiled.record}  # fmt: skip


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def spawn(args: argparse.Namespace, layers: int, mode: str, cache: str) -> dict:
    """One measurement in a fresh process with `cache` as inductor's cache folder."""
    cmd = [sys.executable, __file__, "--worker", f"{layers},{mode}", "--precision",
           args.precision, "--width", str(args.width), "--context", str(args.context)]  # fmt: skip
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": " | ".join(done.stderr.strip().splitlines()[-3:])}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--layers", default="4,12", help="depths to measure (4: the built-in)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, cold caches only: checks that it runs")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/...")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        layers, mode = args.worker.split(",")
        print(json.dumps(worker(int(layers), mode, args.precision, args.width, args.context)))
        return
    if args.quick:
        args.layers, args.width, args.context = "1", 32, 16
    rows = []
    meta = provenance.start("compile_time")
    for layers in (int(n) for n in args.layers.split(",")):
        for mode in ("whole", "regional"):
            with tempfile.TemporaryDirectory(prefix="amptrain-compile-") as cache:
                for temperature in ("cold",) if args.quick else ("cold", "warm"):
                    got = spawn(args, layers, mode, cache)
                    rows.append({"layers": layers, "mode": mode, "cache": temperature, **got})
                    print(json.dumps(rows[-1]), flush=True)
    print("\n| layers | mode | cache | compile s | compiled step s | eager step s |\n"
          "|---:|---|---|---:|---:|---:|")  # fmt: skip
    for r in rows:
        figures = [f"{r[k]:.3f}" if k in r else "error" for k in
                   ("compile_s", "compiled_step_s", "eager_step_s")]  # fmt: skip
        print(f"| {r['layers']} | {r['mode']} | {r['cache']} | {' | '.join(figures)} |")
    meta.update({"precision": args.precision, "width": args.width, "context": args.context})
    out = args.out or provenance.result_file("compile-time", args.quick)
    provenance.write(out, meta, {"results": rows})


if __name__ == "__main__":
    main()
