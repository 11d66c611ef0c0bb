"""The GPU check: what amptrain decides and measures on one real GPU, in one prepared run.

On one GPU, within about 8 minutes, with the machine's own torch:

1. the capability probe's table against the part's datasheet, and `auto`'s decision;
2. the `gpu`-marked tests;
3. 200 steps in fp32, tf32, bf16 and fp16 of a GPT-2-small-class model (124 M parameters,
   V = 50,257, context 1,024): tokens/s, MFU against the dense datasheet peak, peak memory,
   the fast path, and the host synchronisations of the steps that do not log, counted by
   `torch.cuda.set_sync_debug_mode("warn")`;
4. `amptrain bench`, `amptrain doctor`, and `amptrain train` checkpointed then resumed, through
   the command line.

The result goes to `benchmarks/results/gpu-check-<gpu>-cuda<version>-torch<version>.json` with
the commit, command line, date and machine; an existing file is never overwritten.

`--dry-run` takes every step on the CPU with a tiny model (tf32, the GPU tests and the sync
count are CUDA's alone and say so), so the test suite runs the script and it cannot rot.

    python benchmarks/gpu_check.py [--dry-run] [--out DIR] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the working tree's amptrain, on a machine where it is not installed
sys.path.insert(0, str(ROOT / "benchmarks"))

import provenance  # noqa: E402

import amptrain  # noqa: E402
from amptrain import capability, datasheet, hardware  # noqa: E402
from amptrain.callbacks import Callback  # noqa: E402
from amptrain.data import Blocks  # noqa: E402
from amptrain.flops import train_flops_per_token  # noqa: E402
from amptrain.models import GPTConfig, TinyGPT  # noqa: E402
from amptrain.precision import resolve  # noqa: E402

VOCAB = 50_257
GPT2_SMALL = {"layers": 12, "width": 768, "heads": 12, "context": 1024, "batch": 8}
TINY = {"layers": 1, "width": 32, "heads": 2, "context": 32, "batch": 2}
LOG_EVERY = 10


class SyncCounter(Callback):
    """Counts host synchronisations of the steps that do not log (CUDA's sync debug mode)."""

    def __init__(self, log_every: int, max_steps: int) -> None:
        self.log_every, self.max_steps, self.syncs, self.steps = log_every, max_steps, 0, 0
        self._caught: warnings.catch_warnings | None = None
        self._seen: list = []

    def _watch(self, next_step: int) -> None:
        quiet = next_step % self.log_every != 0 and next_step < self.max_steps
        torch.cuda.set_sync_debug_mode("warn" if quiet else "default")
        self.steps += quiet

    def on_fit_start(self, state) -> None:
        self._caught = warnings.catch_warnings(record=True)
        self._seen = self._caught.__enter__()
        warnings.simplefilter("always")
        self._watch(state.step + 1)

    def on_step_end(self, state, metrics) -> None:
        self.syncs += sum("synchroniz" in str(w.message) for w in self._seen)
        self._seen.clear()
        self._watch(state.step + 1)

    def on_fit_end(self, state) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(None, None, None)


def train(device: torch.device, precision: str, shape: dict, steps: int) -> dict:
    """`steps` steps in `precision`; speed, MFU, memory, fast path and the quiet steps' syncs."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, block_size=shape["context"], n_layer=shape["layers"],
                    n_embd=shape["width"], n_head=shape["heads"], dropout=0.0)  # fmt: skip
    model = TinyGPT(cfg).to(device)
    ids = torch.randint(0, VOCAB, (shape["batch"] * (steps + 2), shape["context"]))
    counter = SyncCounter(LOG_EVERY, steps) if device.type == "cuda" else None
    try:
        result = amptrain.fit(model, Blocks(ids, ids.clone(), "random"), precision=precision,
                              max_steps=steps, batch_size=shape["batch"], log_every=LOG_EVERY,
                              callbacks=[counter] if counter else [])  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a refusal (tf32 on a CPU) is a result too
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    flops, how = train_flops_per_token(model, ids[: shape["batch"]].to(device))
    sheet = hardware.datasheet_tflops(device, result.precision)
    achieved = result.tokens_per_s * flops / 1e12
    return {
        "precision": result.precision, "reason": result.reason, "steps": result.steps,
        "tokens_per_s": result.tokens_per_s, "final_train_loss": result.final_train_loss,
        "achieved_tflops": achieved, "flops_per_token": flops, "flops_counted": how,
        "datasheet_tflops": sheet, "mfu_datasheet": achieved / sheet if sheet else None,
        "peak_mem_mb": result.peak_mem_mb, "mem_source": result.mem_source,
        "fast_path": result.fast_path,
        "quiet_step_syncs": None if counter is None else counter.syncs,
        "quiet_steps": None if counter is None else counter.steps,
    }  # fmt: skip


def probe(device: torch.device) -> dict:
    """The probe's table beside the datasheet's, and `auto`'s decision with its reason."""
    caps = capability.probe(device)
    sheet = datasheet.lookup(caps.name) if device.type == "cuda" else None
    auto = resolve("auto", device)
    return {
        "table": caps.to_dict(), "datasheet": None if sheet is None else sheet.name,
        "vs_datasheet": {p: t / sheet.tflops[p] for p, t in caps.tflops.items()
                         if sheet is not None and p in sheet.tflops},
        "auto": auto.name, "auto_reason": auto.reason,
    }  # fmt: skip


def command(argv: list[str], cwd: Path, timeout: int) -> dict:
    """Run one command; its exit code, seconds and the end of its output."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
    return {"argv": argv[1:], "exit_code": code, "seconds": round(time.perf_counter() - start, 1),
            "output_tail": str(output)[-1500:]}  # fmt: skip


def commands(work: Path, shape: dict, device: torch.device, steps: int) -> dict:
    """bench, doctor, and a checkpointed run resumed, through amptrain's command line."""
    tokens = np.random.default_rng(0).integers(0, VOCAB, 400 * shape["context"], dtype=np.uint16)
    tokens[:2] = [0, VOCAB - 1]
    tokens.tofile(work / "train.bin")
    model = ["--model-kwargs", json.dumps({"vocab_size": VOCAB}), "--layers",
             str(shape["layers"]), "--width", str(shape["width"]), "--heads", str(shape["heads"]),
             "--context", str(shape["context"]), "--batch-size", str(shape["batch"]),
             "--device", device.type, "--data", "train.bin", "--no-progress"]  # fmt: skip
    amp = [sys.executable, "-m", "amptrain"]
    half = max(steps // 2, 2)
    out = {
        "bench": command([*amp, "bench", *model, "--steps", str(max(half, 10)), "--warmup-steps",
                          "3", "--repeats", "1", "--no-compile", "--out", "bench"], work, 300),
        "doctor": command([*amp, "doctor", *model, "--batches", "1", "--out", "doctor"],
                          work, 120),
        "train": command([*amp, "train", *model, "--max-steps", str(half), "--checkpoint-every",
                          str(half // 2), "--out", "runs"], work, 300),
    }  # fmt: skip
    out["resume"] = command([*amp, "train", "--resume", "auto", "--out", "runs", "--max-steps",
                             str(half + 2), "--no-progress"], work, 300)  # fmt: skip
    return out


def start(args: argparse.Namespace) -> dict:
    """The run's provenance (`provenance.start`), with the GPU and CUDA it ran on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {**provenance.start("gpu_check"), "gpu": gpu, "cuda": torch.version.cuda,
            "dry_run": args.dry_run}  # fmt: skip


def result_path(folder: Path, meta: dict) -> Path:
    """A new gpu-check-<gpu>-cuda<v>-torch<v>-<start time>.json: a run never overwrites another."""
    gpu = re.sub(r"[^a-z0-9]+", "-", (meta["gpu"] or "cpu-dry-run").lower()).strip("-")
    stamp = re.sub(r"[^0-9T]", "", meta["date"].split("+")[0])
    name = f"gpu-check-{gpu}-cuda{meta['cuda'] or 'none'}-torch{meta['torch'].split('+')[0]}"
    return folder / f"{name}-{stamp}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every step, tiny, on the CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--steps", type=int, default=None, help="200 on a GPU, 4 dry")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here; --dry-run takes the same steps on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    shape, steps = (TINY, args.steps or 4) if args.dry_run else (GPT2_SMALL, args.steps or 200)
    report: dict = {**start(args), "shape": {**shape, "vocab": VOCAB}}
    path = result_path(args.out, report)
    if path.exists():
        parser.error(f"{path} exists; result files are never overwritten")
    report["probe"] = probe(device)
    write(path, report)  # after each section: a run cut short keeps what it measured
    print(json.dumps(report["probe"], indent=2, default=str), flush=True)
    report["gpu_tests"] = (
        {"skipped": "dry run: the gpu tests need a GPU"} if args.dry_run else
        command([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                 "tests"], ROOT, 150)
    )  # fmt: skip
    write(path, report)
    report["train"] = {}
    for name in ("fp32", "tf32", "bf16", "fp16"):
        report["train"][name] = train(device, name, shape, steps)
        write(path, report)
    for name, row in report["train"].items():
        print(name, {k: row.get(k) for k in ("tokens_per_s", "mfu_datasheet", "peak_mem_mb",
                                             "quiet_step_syncs", "error")}, flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        report["commands"] = commands(Path(work), shape, device, steps)
    for name, row in report["commands"].items():
        print(name, row["exit_code"], f"{row['seconds']} s", flush=True)
    report["complete"] = True
    write(path, report)
    print(f"written to {path}")


def write(path: Path, report: dict) -> None:
    """The report so far, written whole and renamed into place (this run's own file, rewritten
    after each section so a run cut short keeps what it measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
