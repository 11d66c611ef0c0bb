"""What the hardware can do and what a model costs.

A matmul peak probe per dtype, datasheet peaks of common GPUs, model FLOPs per token, and
per-process peak memory on Linux.

The probe is the honest denominator for MFU on machines without a datasheet figure (CPUs);
the datasheet figure is shown beside it where the device is known.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain.adapter import forward_logits

# Dense (no sparsity) peak TFLOP/s by precision, from the vendors' datasheets (SXM parts).
DATASHEET_TFLOPS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
    "H100": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
}

_PROBE_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16}  # fmt: skip


def datasheet_tflops(device: torch.device, precision: str) -> float | None:
    """The datasheet peak for a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DATASHEET_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None


@functools.cache
def probe_tflops(device: torch.device, precision: str, seconds: float = 0.5) -> float:
    """Best measured TFLOP/s of a square matmul in the precision's dtype (TF32 on for tf32).

    Cached per process: the hardware does not change between calls.
    """
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=_PROBE_DTYPE[precision])
    b = torch.randn(n, n, device=device, dtype=_PROBE_DTYPE[precision])
    tf32 = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    try:
        a @ b  # warm-up: kernel selection, allocator
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e12)
    finally:
        torch.backends.cuda.matmul.fp32_precision = tf32
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops_per_token(model: nn.Module, ids: torch.Tensor) -> tuple[float, str]:
    """FLOPs of one forward + backward per token, and how they were obtained.

    Counted with `torch.utils.flop_counter` on one batch; if the counter sees nothing (an
    operator set it does not know), the 6N estimate (N = parameters) is returned instead.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        forward_logits(model, ids, ids).float().sum().backward()
    model.zero_grad(set_to_none=True)
    total = counter.get_total_flops()
    if total > 0:
        return total / ids.numel(), "counted (torch.utils.flop_counter, forward + backward)"
    n_params = sum(p.numel() for p in model.parameters())
    return 6.0 * n_params, "estimated (6N, N = parameters)"


def _glibc_heap_to_os() -> None:
    """Return freed heap pages to the OS and serve large blocks by mmap from now on (glibc).

    A forked worker inherits its parent's freed-but-resident heap; without this, an arm
    could reuse those pages and its RSS would understate what it allocates.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so freed large blocks go back


def reset_peak_rss() -> float | None:
    """Reset this process's peak RSS to its current RSS (Linux); returns the current RSS in MB."""
    _glibc_heap_to_os()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS")
    except OSError:
        return None


def peak_rss_mb() -> float | None:
    """This process's peak RSS in MB since start or the last `reset_peak_rss` (Linux)."""
    try:
        return _status_mb("VmHWM")
    except OSError:
        return None


def _status_mb(field: str) -> float:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def measure_memory(
    device: torch.device, work: Callable[[], object], timeout: float = 600.0
) -> tuple[float | None, float | None, str]:
    """Peak memory of `work`, measured in isolation: `(peak_mb, increment_mb, source)`.

    On CUDA: the allocator's peak after a reset, and its increment over what was allocated
    before. On CPU: `work` runs in a forked worker process (one thread; speed is not measured
    there) whose freed heap is returned to the OS first, so the increment of its peak RSS is
    what `work` itself needed.

    Raises:
        Exception: Whatever `work` raised (in the worker, on CPU), or TimeoutError.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        work()
        peak, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved()
        source = f"cuda-allocator (peak reserved {reserved / 2**20:.0f} MB)"
        return peak / 2**20, (peak - before) / 2**20, source
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=_memory_worker, args=(child, work))
    worker.start()
    child.close()
    got = parent.recv() if parent.poll(timeout) else TimeoutError("memory worker timed out")
    worker.join(5)
    if worker.is_alive():
        worker.kill()
    if isinstance(got, BaseException):
        raise got
    peak, delta = got
    return peak, delta, "process-rss: peak-RSS increment of a forked worker process"


def _memory_worker(conn: Any, work: Callable[[], object]) -> None:
    torch.set_num_threads(1)  # OpenMP thread pools do not survive fork
    try:
        base = reset_peak_rss()
        work()
        peak = peak_rss_mb()
        conn.send((peak, None if base is None or peak is None else peak - base))
    except BaseException as exc:  # report, never hang the parent
        try:
            conn.send(exc)
        except Exception:  # an exception that does not pickle
            conn.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
