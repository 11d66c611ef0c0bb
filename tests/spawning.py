"""Start a test's worker function in 2 real processes with a gloo process group on localhost."""

from __future__ import annotations

import importlib
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amptrain import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(module: str, case: str, tmp_path, *args, nprocs: int = 2) -> None:
    """Run `module._case_<case>(rank, tmp, *args)` on `nprocs` ranks; raises if one fails."""
    mp.start_processes(_worker, args=(nprocs, free_port(), module, case, str(tmp_path), *args),
                       nprocs=nprocs, start_method="spawn")  # fmt: skip


def _worker(rank, world, port, module, case, tmp, *args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    getattr(importlib.import_module(module), f"_case_{case}")(rank, tmp, *args)
    distributed.shutdown()
    distributed.end_worker(0)
