"""The end of every benchmarked step, marked without a host sync; the step times read after."""

from __future__ import annotations

import time
from typing import Any

import torch


class StepClock:
    """The end of every step, marked without a host sync; the step times read at the end.

    On CUDA each mark is an event recorded on the device's stream, and the times are the
    intervals between consecutive events, read after one synchronisation once training is
    over: a synchronisation per step would drain the GPU's queue and time the drain. On a CPU
    a mark is the wall clock.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[Any] = []

    def mark(self) -> None:
        """The step that just ended, as the device sees it."""
        if self.device.type != "cuda":
            self.marks.append(time.perf_counter())
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self.marks.append(event)

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks (one synchronisation on CUDA)."""
        if self.device.type != "cuda":
            return [b - a for a, b in zip(self.marks, self.marks[1:])]
        if self.marks:
            self.marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
