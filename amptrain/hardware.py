"""What the hardware can do and what a model costs.

The MFU peak (the best of the capability probe and matmuls at the model's own shapes),
datasheet peaks of common GPUs, and the one peak-memory reader (`reset_peak_memory`, then
`peak_memory_mb`) every run and benchmark measures with. Model FLOPs: `amptrain.flops`.

The peak is the honest denominator for MFU on machines without a datasheet figure (CPUs);
the datasheet figure is shown beside it where the device is known.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import allocator, capability, datasheet


def datasheet_tflops(device: torch.device, precision: str) -> float | None:
    """The datasheet's dense peak for a known GPU part (`amptrain.datasheet`), else None."""
    if device.type != "cuda":
        return None
    sheet = datasheet.lookup(capability.device_name(device))
    return None if sheet is None else sheet.tflops.get(precision)


def peak_tflops(
    device: torch.device, precision: str, model: nn.Module, tokens: int, budget_s: float = 0.05
) -> tuple[float, str]:
    """The best matmul TFLOP/s seen in the precision: the capability probe, or the model's own.

    The model's own nn.Linear shapes at `tokens` rows are probed too (an emulated precision is
    left at the capability probe's figure: its big matmuls would take seconds), and the best of
    all is the MFU denominator, with a line saying where it came from.
    """
    caps = capability.probe(device)
    best = caps.tflops.get(precision, 0.0)
    source = f"capability probe {caps.shape[0]}x{caps.shape[1]}x{caps.shape[2]}"
    if caps.emulated(precision):
        return best, source + " (emulated here; model shapes not probed)"
    for shape in _linear_shapes(model, tokens):
        speed = capability.matmul_tflops(device, precision, shape, budget_s)
        if speed > best:
            best, source = (
                speed,
                f"matmul probe at the model's shape {shape[0]}x{shape[1]}x{shape[2]}",
            )
    return best, source


def _linear_shapes(model: nn.Module, tokens: int) -> list[tuple[int, int, int]]:
    shapes = {(tokens, m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, nn.Linear)}  # fmt: skip
    return sorted(shapes)[:8]


def reset_peak_memory(device: torch.device, return_freed: bool = False) -> float | None:
    """Start the device's peak-memory reading afresh, for one run (`peak_memory_mb`).

    Returns what is in use now, in MB (the run's baseline), where it can be read.

    CUDA: the allocator's peak statistics of `device`; in use: `memory_allocated`. CPU
    (Linux): the process's peak RSS is set back to its current RSS (`/proc/self/clear_refs`);
    in use: the RSS. The run's peak then counts what the process holds plus what the run adds.
    With `return_freed`, the process's freed-but-resident heap is handed back to the OS first
    (`allocator.return_freed_memory`): a forked worker inherits its parent's, and a run could
    reuse those pages, so its RSS would understate what it allocates. Elsewhere nothing resets,
    and the peak stays the process's lifetime peak (its source says so).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    if return_freed:
        allocator.return_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS")
    except OSError:
        return None


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """The peak memory since the last `reset_peak_memory`, and its source.

    CUDA: the caching allocator's peak on `device` ("cuda-allocator"). CPU: the process's peak
    RSS ("process-rss": VmHWM on Linux; the lifetime `ru_maxrss` elsewhere).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda-allocator"
    try:
        return _status_mb("VmHWM"), "process-rss"
    except OSError:
        pass
    import resource  # noqa: PLC0415 (POSIX only)

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**20 if sys.platform == "darwin" else 2**10), "process-rss (lifetime)"


def _status_mb(field: str) -> float:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


class WorkerKilled(RuntimeError):
    """The forked memory worker died without a word: the OOM killer, or another signal."""


def measure_memory(
    device: torch.device,
    work: Callable[[], object],
    timeout: float = 600.0,
    oom_first: bool = False,
) -> tuple[float | None, float | None, str]:
    """Peak memory of `work`, measured in isolation: `(peak_mb, increment_mb, source)`.

    On CUDA: the allocator's peak after a reset, and its increment over what was allocated
    before. On CPU: `work` runs in a forked worker process (one thread; speed is not measured
    there) whose freed heap is returned to the OS first, so the increment of its peak RSS is
    what `work` itself needed. With `oom_first` the worker asks to be the OOM killer's first
    choice, so that work too large for the machine kills the worker and not its parent.

    Raises:
        Exception: Whatever `work` raised (in the worker, on CPU), or TimeoutError.
        WorkerKilled: If the worker died without reporting (killed for memory, on CPU).
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        before = reset_peak_memory(device)
        work()
        peak, _ = peak_memory_mb(device)
        reserved = torch.cuda.max_memory_reserved(device)
        source = f"cuda-allocator (peak reserved {reserved / 2**20:.0f} MB)"
        return peak, peak - before, source
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=_memory_worker, args=(child, work, oom_first))
    worker.start()
    child.close()
    try:
        got = parent.recv() if parent.poll(timeout) else TimeoutError("memory worker timed out")
    except EOFError:  # it died before sending anything
        worker.join(5)
        got = WorkerKilled(f"the memory worker died (exit code {worker.exitcode})")
    worker.join(5)
    if worker.is_alive():
        worker.kill()
    if isinstance(got, BaseException):
        raise got
    peak, delta = got
    return peak, delta, "process-rss: peak-RSS increment of a forked worker process"


def _memory_worker(conn: Any, work: Callable[[], object], oom_first: bool = False) -> None:
    torch.set_num_threads(1)  # OpenMP thread pools do not survive fork
    if oom_first:
        with contextlib.suppress(OSError):  # raising one's own score needs no privilege
            Path("/proc/self/oom_score_adj").write_text("1000")
    try:
        cpu = torch.device("cpu")
        base = reset_peak_memory(cpu, return_freed=True)
        work()
        peak, _ = peak_memory_mb(cpu)
        conn.send((peak, None if base is None else peak - base))
    except BaseException as exc:  # report, never hang the parent
        try:
            conn.send(exc)
        except Exception:  # an exception that does not pickle
            conn.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
