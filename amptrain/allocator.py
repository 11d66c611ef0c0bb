"""Host memory kept for reuse between CPU steps: glibc's malloc, measured, then tuned.

A CPU training step frees and allocates the same large buffers every step (activations, their
gradients, the logits). glibc's malloc serves a large block with fresh pages from `mmap` and
hands freed memory back to the kernel, so each step touches its buffers for the first time
again: one minor page fault per 4 KiB page, each page zero-filled by the kernel before the
step writes it. jemalloc and tcmalloc keep freed memory instead (torch's CPU launcher
preloads one of them); amptrain gets the same from glibc with two `mallopt` settings: freed
memory is not trimmed back to the kernel, and blocks up to glibc's largest threshold
(32 MiB) come from the heap, where freed blocks are reused.

By measurement (`allocator="auto"`, on CPU under glibc): the minor page faults of a few
training steps are counted (`getrusage`, steps 3 to 5, the step alone); when they exceed
`FAULTS_PER_STEP`, the settings are made and the faults of the next steps are counted again.
Both counts and the reason go to the fast-path record. Left alone: a sharded (FSDP) model,
whose point is the memory it gives back, and a process whose environment tunes malloc or
preloads another one. The settings are process-wide and stay
for the life of the process (glibc cannot go back to its adaptive thresholds): peak memory is
unchanged, but the process keeps it between steps rather than giving it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import resource
import sys
from collections.abc import Iterator
from typing import Any

import torch

FAULTS_PER_STEP = 1024
"""Minor page faults per step (4 MiB first-touched) above which freed memory is kept."""

TRIM_THRESHOLD = 1 << 30
"""Freed memory at the top of the heap kept up to this much (glibc's default: 128 KiB)."""

MMAP_THRESHOLD = 32 << 20
"""Blocks below this come from the heap (glibc's largest allowed value on 64-bit systems)."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_TUNED_BY = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")
_PHASES = {"before": range(3, 6), "after": range(7, 10)}  # the steps counted, by phase
# Step 6, the first under the new settings, is left out: its buffers still come from fresh pages.
_kept: list[str] = []  # why this process keeps freed memory, once it does


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with `mallopt` (Linux), else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> str:
    """Make glibc keep freed memory for reuse; a description of what was set ("" if nothing)."""
    libc = glibc()
    if libc is None or not (libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                            and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)):  # fmt: skip
        return ""
    return (f"mallopt(M_TRIM_THRESHOLD={TRIM_THRESHOLD >> 20} MiB, "
            f"M_MMAP_THRESHOLD={MMAP_THRESHOLD >> 20} MiB)")  # fmt: skip


def return_freed_memory() -> None:
    """Hand freed heap memory back to the kernel and serve blocks over 64 KiB by mmap (glibc).

    What a memory measurement that starts in a forked process needs (`hardware.reset_peak_memory`);
    it undoes `keep_freed_memory` until a run keeps freed memory again.
    """
    libc = glibc()
    if libc is None:
        return
    libc.malloc_trim(0)
    libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)  # fixed: freed large blocks go back at once
    _kept.clear()


def reset() -> None:
    """Hand back freed memory this process keeps, if it does (`return_freed_memory`).

    The next run then measures its page faults afresh.
    """
    if _kept:
        return_freed_memory()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class StepFaults:
    """Counts the page faults of the first steps and keeps freed memory when they are many.

    `step(n)` brackets training step `n` (1-based); `record` is what the fast-path record says.
    """

    def __init__(self, choice: str, device: torch.device, sharded: bool = False) -> None:
        self.record: dict[str, Any] = {"allocator": "system"}
        self._counts: dict[str, list[int]] = {}  # the measured phases still open
        if choice == "system":
            self.record["allocator_reason"] = "asked for (allocator='system')"
        elif device.type != "cpu":
            self.record["allocator_reason"] = f"{device.type}: host memory is not the step's"
        elif sharded:  # kept, the blocks FSDP gathers and frees stay resident on every rank
            self.record["allocator_reason"] = "sharded: FSDP frees what it gathers, for memory"
        elif glibc() is None:
            self.record["allocator_reason"] = "not glibc: its allocator is left as it is"
        elif set(_TUNED_BY) & set(os.environ):
            given = ", ".join(sorted(set(_TUNED_BY) & set(os.environ)))
            self.record["allocator_reason"] = f"{given} set in the environment: left as set"
        elif _kept:
            reason = f"set earlier in this process: {_kept[0]}"
            self.record.update(allocator="kept", allocator_reason=reason)
        else:
            self.record["allocator_reason"] = "not measured: the run ended before step 6"
            self._counts = {"before": [], "after": []}

    def step(self, n: int) -> contextlib.AbstractContextManager:
        """The scope of training step `n`: counting its faults if it is a measured one."""
        for phase, steps in _PHASES.items():
            if n in steps and phase in self._counts:
                return self._count(phase)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _count(self, phase: str) -> Iterator[None]:
        start = _minor_faults()
        yield
        counts = self._counts[phase]
        counts.append(_minor_faults() - start)
        if len(counts) < len(_PHASES[phase]):
            return
        if phase == "before":
            self._decide()
        else:
            self.record["allocator_faults_after"] = _per_step(counts)

    def _decide(self) -> None:
        faults = _per_step(self._counts["before"])
        self.record["allocator_faults_per_step"] = faults
        seen = f"{faults:,} minor page faults per step ({faults * 4 // 1024} MiB first-touched)"
        if faults <= FAULTS_PER_STEP:
            self.record["allocator_reason"] = f"{seen}: at most {FAULTS_PER_STEP:,}, left as is"
            del self._counts["after"]
            return
        what = keep_freed_memory()
        if not what:
            self.record["allocator_reason"] = f"{seen}, but glibc refused the settings"
            del self._counts["after"]
            return
        self.record.update(allocator="kept", allocator_reason=f"{seen}: {what}")
        _kept[:] = [self.record["allocator_reason"]]  # what later runs in this process say


def _per_step(counts: list[int]) -> int:
    return sorted(counts)[len(counts) // 2]  # the median step
