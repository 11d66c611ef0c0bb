"""A benchmark configuration in a fresh process: its memory above idle, its step time.

`lora.py` and `memory_levers.py` run each configuration in its own interpreter, so one's memory
never counts in another's: `run` starts the script again as a worker and reads the JSON line it
prints last; in the worker, `idle_mb` is the process's memory before the model is built and
`Clock` times the optimizer steps with amptrain's own step clock.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import torch

from amptrain.bench.clock import StepClock
from amptrain.callbacks import Callback
from amptrain.hardware import reset_peak_memory


def run(script: str, *args: str) -> dict:
    """The figures a worker run of `script` prints as its last line (a JSON object)."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def idle_mb() -> float:
    """The process's resident memory now, in MB (the baseline a run's peak is counted above)."""
    return reset_peak_memory(torch.device("cpu"))


class Clock(Callback):
    """Marks the end of every optimizer step; `step_s` is the median step after the warm-up."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.clock = StepClock(torch.device(device))

    def on_step_end(self, state, metrics) -> None:  # noqa: D102
        self.clock.mark()

    def step_s(self, warmup: int) -> float:
        """The median seconds of the steps after the first `warmup`."""
        return statistics.median(self.clock.intervals()[warmup:])
