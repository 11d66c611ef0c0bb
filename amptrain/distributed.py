"""torch.distributed glue for the loop: the process group and the few collectives it needs.

The process group comes from torchrun's environment; the collectives are sums, maxima, an
agreed stop, gathered RNG states and a broadcast of rank 0's run directory.

Everything here is a no-op in a single process, so the loop calls it unconditionally.
torch.distributed is for trusted networks only; `amptrain train --nproc N` binds its
rendezvous to localhost.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys
from typing import Any

import torch
import torch.distributed as dist

from amptrain.errors import ConfigError, EnvironmentFailure

log = logging.getLogger("amptrain")

_left = False  # this process left a process group whose gloo threads may outlive it


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0, the rank that writes files and prints."""
    return world()[0] == 0


def world_size_from_env() -> int:
    """The WORLD_SIZE torchrun (or another launcher) set for this process; 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE > 1 for this process."""
    return world_size_from_env() > 1


def uses_cuda(device: str) -> bool:
    """True when a run asked for `device` ("auto", "cpu", "cuda", "cuda:1") trains on CUDA."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def check_processes(nproc: int, device: str) -> None:
    """Refuse, before any process starts, `nproc` processes on `device` that cannot run.

    Every process on CUDA takes the GPU of its local rank: there must be that many GPUs, and
    one named GPU cannot serve several processes. On the CPU they join a gloo group.

    Raises:
        ConfigError: Naming the count, the GPUs visible and the fixes.
    """
    if nproc == 1 or not uses_cuda(device):
        return
    if ":" in device:
        raise ConfigError(
            f"--device {device} with --nproc {nproc}: each process takes the GPU of its local "
            "rank; pass --device cuda (with CUDA_VISIBLE_DEVICES to choose the GPUs)"
        )
    visible = torch.cuda.device_count()
    if nproc > visible:
        raise ConfigError(
            f"--nproc {nproc} needs one GPU per process and {visible} GPU(s) are visible here; "
            f"give --nproc {visible} or less, or --device cpu to run {nproc} CPU processes"
        )


def init_from_env(device: str = "auto") -> torch.device | None:
    """Join the process group torchrun describes; returns this rank's device (None if single).

    The backend is NCCL when the run trains on CUDA (`device`), gloo otherwise: `--device cpu`
    on a GPU machine runs CPU processes.

    Raises:
        ConfigError: A local rank without a GPU of its own (more processes than GPUs on a node).
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if uses_cuda(device):
        check_processes(int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)), device)
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=collective_timeout()))
    log.debug("rank %d of %d on %s (%s)", dist.get_rank(), dist.get_world_size(), device, backend)
    return device


TIMEOUT_ENV = "AMPTRAIN_COLLECTIVE_TIMEOUT"
"""Seconds a rank waits in a collective for the others (default 600, torch's own)."""

_PEER_LOST = re.compile(r"timed out|timeout|closed by peer|pair closure|connection reset|"
                        r"watchdog caught collective", re.IGNORECASE)  # fmt: skip


def collective_timeout() -> float:
    """`AMPTRAIN_COLLECTIVE_TIMEOUT` in seconds, or 600.

    Raises:
        ConfigError: For a value that is not a positive number of seconds.
    """
    text = os.environ.get(TIMEOUT_ENV, "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds "
                          "(e.g. 600)")  # fmt: skip
    return seconds


def peer_lost(exc: BaseException) -> EnvironmentFailure | None:
    """A collective that timed out or lost a peer, as one line; None for any other error.

    A rank that waits in vain for the others says so, and for how long, instead of torch's
    backend report (lines of C++ locations); the rank that failed first has its own line.
    """
    if not launched_by_torchrun() or not isinstance(exc, RuntimeError):
        return None
    text = " ".join(str(exc).split())
    if not _PEER_LOST.search(text):
        return None
    first = str(exc).strip().splitlines()[-1][:200]
    return EnvironmentFailure(
        f"a collective waited for the other processes in vain (limit {collective_timeout():g} "
        f"s; {first}); one of them is stuck or gone; set {TIMEOUT_ENV} to wait longer"
    )


def shutdown() -> None:
    """Leave the process group, if any, once every rank is done.

    Rank 0 still writes files after the others have finished; tearing the group down under it
    can abort the process that hosts the rendezvous store.
    """
    global _left
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        # else a failure is on its way out: the other ranks may be waiting in a collective
        # that will never complete, so this rank leaves at once; the launcher then stops them.
        dist.destroy_process_group()
        _left = True


def end_worker(code: int) -> int:
    """End a process that left a process group with `code`, skipping interpreter teardown.

    `shutdown` leaves the group, but the gloo backend's worker threads live on while anything
    still references the group (FSDP's mesh does, through autograd hooks), and are then torn
    down during interpreter finalization, which aborts the process at random (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch#190489): a finished run
    that torchrun reports as failed. Once the run is written and the group left, the worker
    flushes its output and exits at once. Returns `code` unchanged in a process that never
    left a group.
    """
    if not _left:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum or max a few numbers across ranks (float64, one collective)."""
    if world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor across ranks, left on the device (no host read); itself when single."""
    if world()[1] == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def gather(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (a list by rank); None on the other ranks."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def said_by_rank_0(exc: BaseException) -> BaseException:
    """`exc`, marked as a failure every rank met and rank 0 reports: the others stay quiet."""
    exc.said_by_rank_0 = True  # type: ignore[attr-defined]
    return exc


def barrier() -> None:
    """Wait for every rank."""
    if world()[1] > 1:
        dist.barrier()
