"""How the capability probe times a matmul: the clock per device kind, and the rate it gives.

A timer is a callable `(precision, shape, repeats) -> seconds` that runs `repeats` matmuls of
`shape = (n, k, m)` in the precision's dtype and says how long they took by its clock:

- CPU: the CPU time of the calling thread, with torch held to that one thread. Time the
  process spent waiting for a core while other jobs ran is not counted, so a busy machine reads
  the same rates as a quiet one (a wall-clock probe there read bf16 as emulated and fp16 as
  native in turn). The rate of all threads is the one thread's rate times the thread count:
  the peak a perfectly parallel matmul reaches, which is what an MFU denominator is.
- CUDA: CUDA events around a batch of back-to-back matmuls after a warm-up, so neither kernel
  launch nor host synchronisation is counted as matmul time.
- A simulated GPU (`amptrain.simulated_gpu`) brings its own timer, a model of launch cost and
  per-dtype peaks, so the CUDA decisions are tested on a CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch

from amptrain import tf32

Timer = Callable[[str, tuple[int, int, int], int], float]

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
          "bf16": torch.bfloat16}  # fmt: skip
# At most this many matmuls in one timed batch, however fast they run.
MAX_REPEATS = 200


def rate(timer: Timer, precision: str, shape: tuple[int, int, int], budget_s: float) -> float:
    """TFLOP/s of the precision's matmul by `timer`, spending about `budget_s` of its clock.

    One matmul is timed first (it also warms the kernels up); if it left room in the budget, a
    batch sized to fill the rest is timed and gives the rate. A precision so slow that one
    matmul fills the budget is judged on that one matmul, which already tells it apart.
    """
    flops = 2 * math.prod(shape)
    one = max(timer(precision, shape, 1), 1e-9)
    repeats = min(MAX_REPEATS, int(budget_s / one))
    if repeats < 2:
        return flops / one / 1e12
    return flops * repeats / max(timer(precision, shape, repeats), 1e-9) / 1e12


@contextlib.contextmanager
def cpu_timer() -> Iterator[Timer]:
    """The CPU timer, with torch held to one thread (the caller's) while it is in use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the matmul runs on this thread, whose clock we read

    def timer(precision: str, shape: tuple[int, int, int], repeats: int) -> float:
        a, b = _operands("cpu", precision, shape)
        start = time.thread_time()
        for _ in range(repeats):
            a @ b
        return (time.thread_time() - start) / threads  # the rate of `threads` such threads

    try:
        yield timer
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def cuda_timer(device: torch.device) -> Iterator[Timer]:
    """The CUDA timer on `device`: events around back-to-back matmuls, after a warm-up."""

    def timer(precision: str, shape: tuple[int, int, int], repeats: int) -> float:
        a, b = _operands(device, precision, shape)
        with tf32.matmul_mode(precision == "tf32"):
            a @ b  # warm-up: cuBLAS handle, workspace and heuristics, outside the timing
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record(torch.cuda.current_stream(device))
            for _ in range(repeats):
                a @ b
            end.record(torch.cuda.current_stream(device))
            end.synchronize()
        return start.elapsed_time(end) / 1e3

    with torch.cuda.device(device):
        yield timer


def _operands(
    device: str | torch.device, precision: str, shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    n, k, m = shape
    dtype = DTYPES[precision]
    return (torch.randn(n, k, device=device).to(dtype), torch.randn(k, m, device=device).to(dtype))
