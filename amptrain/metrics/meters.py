"""Pure meters: throughput. No I/O, so they test with fake clocks (peak memory: `hardware`)."""

from __future__ import annotations


class Throughput:
    """Tokens per second and seconds per step over the window since the last `compute()`.

    The caller passes the times; on CUDA it must synchronise before reading the clock, or
    the time measures only how fast kernels were queued.
    """

    def __init__(self, start: float) -> None:
        self._t0 = start
        self._tokens = 0
        self._steps = 0

    def update(self, tokens: int, steps: int = 1) -> None:
        """Count work done since the window opened."""
        self._tokens += tokens
        self._steps += steps

    def compute(self, now: float) -> dict[str, float]:
        """Close the window at `now`, return its rates and open a new one."""
        elapsed = max(now - self._t0, 1e-12)
        out = {
            "perf/tokens_per_s": self._tokens / elapsed,
            "perf/step_time_s": elapsed / max(self._steps, 1),
        }
        self._t0, self._tokens, self._steps = now, 0, 0
        return out
