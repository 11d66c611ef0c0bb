"""Part (c) of `memory_levers.py`: does a lever keep quality? The built-in model fine-tuned on the
built-in corpus, each configuration in its own `amptrain train` process, at two learning rates.

The reference is the fp32-master run (bf16 autocast); a configuration keeps quality when its
final validation loss is within `TOLERANCE` of the reference's at the same learning rate. At a
small learning rate nearest rounding drops most bf16 updates, so the uncompensated run should
be visibly worse there: that is what compensation is for.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "fp32": ["--precision", "fp32"],
    "bf16 autocast": ["--precision", "bf16"],
    "bf16-true, Kahan": ["--precision", "bf16-true", "--compensation", "kahan"],
    "bf16-true, SR": ["--precision", "bf16-true", "--compensation", "sr"],
    "bf16-true, SR + 8-bit state": ["--precision", "bf16-true", "--compensation", "sr",
                                    "--optimizer-state", "8bit"],
    "bf16-true, none": ["--precision", "bf16-true", "--compensation", "none"],
}  # fmt: skip
REFERENCE = "bf16 autocast"
TOLERANCE = 0.01
"""A configuration keeps quality within this relative gap of the reference's validation loss."""


def train_loss(flags: list[str], steps: int, lr: str) -> dict:
    """Final and best validation loss of one `amptrain train` run in a fresh process."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "amptrain", "train", "--device", "cpu", "--no-progress",
               "--no-compile", "--max-steps", str(steps), "--lr", lr, "--out", out,
               *flags]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
        (run,) = Path(out).glob("train-*")
        summary = json.loads((run / "summary.json").read_text())
    return {"final_val_loss": summary["final_val_loss"], "best_val_loss": summary["best_val_loss"],
            "command": " ".join(["amptrain", *cmd[3:-2]])}  # fmt: skip


def measure(steps: int, lrs: list[str], quick: bool) -> dict:
    """Every configuration at every learning rate, with its gap to the reference."""
    configs = dict(list(CONFIGS.items())[:3]) if quick else CONFIGS
    table = {}
    for lr in lrs:
        runs = {name: train_loss(flags, steps, lr) for name, flags in configs.items()}
        ref = runs[REFERENCE]["final_val_loss"]
        for name, run in runs.items():
            run["gap_vs_reference"] = run["final_val_loss"] / ref - 1
            run["keeps_quality"] = abs(run["gap_vs_reference"]) <= TOLERANCE
            print(
                f"lr {lr} | {name} | val loss {run['final_val_loss']:.4f} | "
                f"{run['gap_vs_reference']:+.2%} vs {REFERENCE}"
            )
        table[lr] = runs
    return {"steps": steps, "reference": REFERENCE, "tolerance": TOLERANCE, "runs": table}
