"""Part (d) of `memory_levers.py`: the largest GPT of one shape family whose full fine-tuning
step runs within a memory budget, per configuration.

The family: tiny-gpt's code with width 64k, k layers and k heads (the byte vocabulary, context
128), so the parameters grow as about 12 k^3 64^2. A size fits when `STEPS` optimizer steps at
batch 1 finish with the process's peak RSS, above the idle process, within the budget. Each
size runs in a fresh process with a watchdog that ends it (exit 3) once its memory passes the
budget, so a size too large never presses the machine. The search starts at the size the
configuration's bytes a parameter predict and walks to the boundary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

CONFIGS = {
    "bf16 autocast": ("bf16", {}),
    "bf16 autocast + 8-bit state": ("bf16", {"optimizer_state": "8bit"}),
    "bf16-true, Kahan": ("bf16-true", {}),
    "bf16-true, SR": ("bf16-true", {"compensation": "sr"}),
    "bf16-true, SR + 8-bit state": ("bf16-true", {"compensation": "sr", "optimizer_state": "8bit"}),
}  # fmt: skip
BYTES = {"bf16 autocast": 16, "bf16 autocast + 8-bit state": 10, "bf16-true, Kahan": 10,
         "bf16-true, SR": 8, "bf16-true, SR + 8-bit state": 6}  # fmt: skip
STEPS, CONTEXT = 3, 128
OVER = 3
"""The worker's exit code when its memory passed the budget."""


def shape(k: int) -> dict:
    return {"n_layer": k, "n_embd": 64 * k, "n_head": k}


def parameters(k: int) -> int:
    from amptrain.models import GPTConfig

    return GPTConfig(vocab_size=256, block_size=CONTEXT, **shape(k)).n_params


def worker(config: str, k: int, budget_mb: float) -> dict:
    """Train size `k` for `STEPS` steps in this process; exit `OVER` past the budget."""
    import amptrain
    from amptrain.hardware import reset_peak_memory
    from amptrain.models import GPTConfig, TinyGPT

    idle = reset_peak_memory(torch.device("cpu"))
    _watch(idle, budget_mb)
    precision, extra = CONFIGS[config]
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=256, block_size=CONTEXT, **shape(k)))
    data = torch.randint(0, 256, (STEPS + 1, CONTEXT))
    start = time.perf_counter()
    result = amptrain.fit(model, data[:STEPS], data[STEPS:], precision=precision, max_steps=STEPS,
                          batch_size=1, eval_every=STEPS, eval_batches=1, compile=False,
                          allocator="system", memory_budget=f"{budget_mb}MiB",
                          **extra)  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - start
    return {"k": k, "parameters": params, "peak_mb": result.peak_mem_mb - idle, "seconds": seconds}


def _watch(idle_mb: float, budget_mb: float) -> None:
    """A thread that ends the process once its RSS passes `budget_mb` above `idle_mb`."""

    def poll() -> None:
        status = Path(f"/proc/{os.getpid()}/status")
        while True:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:") and int(line.split()[1]) / 1024 - idle_mb > budget_mb:
                    os._exit(OVER)
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()


def probe(script: str, config: str, k: int, budget_mb: float) -> dict | None:
    """Size `k`'s figures, or None when it does not fit."""
    import json

    cmd = [sys.executable, script, "--largest-worker", config, str(k), str(budget_mb)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    refused = "optimizer state take" in done.stderr  # the preflight: the state alone is too big
    if done.returncode == OVER or (done.returncode != 0 and refused):
        return None
    if done.returncode != 0:
        raise RuntimeError(f"{config} k={k} failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result if result["peak_mb"] <= budget_mb else None


def largest(script: str, config: str, budget_mb: float, say=print) -> dict:
    """The largest size of the family that fits, walking from the predicted one."""
    k = 1
    while parameters(k + 1) * BYTES[config] <= budget_mb * 2**20 * 0.9:
        k += 1  # the size the bytes a parameter alone would allow, less a tenth for the rest
    tried: dict[int, dict | None] = {}

    def fits(k: int) -> bool:
        if k not in tried:
            tried[k] = probe(script, config, k, budget_mb)
            say(f"  {config} k={k} ({parameters(k) / 1e6:,.0f} M): "
                f"{'fits' if tried[k] else 'does not fit'}")  # fmt: skip
        return tried[k] is not None

    while k > 1 and not fits(k):
        k -= 1
    while fits(k + 1):
        k += 1
    best = tried.get(k) or {}
    tried_sizes = {str(size): figures for size, figures in tried.items()}
    return {"k": k, "shape": shape(k), "parameters": parameters(k),
            "peak_mb": best.get("peak_mb"), "tried": tried_sizes}  # fmt: skip


def measure(script: str, budget_gib: float, quick: bool) -> dict:
    """Every configuration's largest size, and each against bf16 autocast's."""
    budget_mb = budget_gib * 1024
    if quick:  # does it run? one small size of two configurations
        rows = {c: {"k": 2, "parameters": parameters(2), "fits": probe(script, c, 2, budget_mb)}
                for c in ("bf16 autocast", "bf16-true, SR + 8-bit state")}  # fmt: skip
        return {"budget_gib": budget_gib, "quick": True, "configs": rows}
    rows = {c: largest(script, c, budget_mb) for c in CONFIGS}
    base = rows["bf16 autocast"]["parameters"]
    for config, row in rows.items():
        row["parameters_vs_bf16_autocast"] = row["parameters"] / base
        print(
            f"| {config} | k={row['k']} ({row['parameters'] / 1e6:,.0f} M parameters) | "
            f"{row['parameters_vs_bf16_autocast']:.2f}x |"
        )
    return {"budget_gib": budget_gib, "steps": STEPS, "context": CONTEXT, "batch": 1,
            "family": "tiny-gpt, width 64k, k layers, k heads", "configs": rows}  # fmt: skip
