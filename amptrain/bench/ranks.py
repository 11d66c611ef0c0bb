"""The benchmark on several processes (`amptrain bench --nproc N --strategy ddp|fsdp`).

Every rank trains every arm on its share of each global batch, as `fit` does under
torch.distributed. The figures are then of the whole job: tokens/s counts every rank's tokens
(rank 0's clock: the collectives hold the ranks together at every step), memory is per rank
and the report gives the largest rank's, and the fairness digests cover every rank's batches.
In one process everything here changes nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from amptrain import distributed, hardware
from amptrain.errors import ConfigError

MEMORY_IN_PLACE = "process-rss: peak-RSS increment of each rank's own process over the run"


def check_strategy(strategy: str, world_size: int) -> None:
    """Refuse a sharded benchmark that would shard nothing (one process), before any work.

    Raises:
        ConfigError: Naming the strategy, the number of processes and the fix.
    """
    if strategy == "fsdp" and world_size == 1:
        raise ConfigError(
            "strategy 'fsdp' on 1 process shards nothing, so the benchmark would not measure "
            "sharding: run it on 2 or more processes (amptrain bench --nproc 2 --strategy fsdp)"
        )


def global_digest(local: str) -> str:
    """One digest of every rank's batch checksum (rank 0's answer; the others keep `local`)."""
    gathered = distributed.gather(local)
    if gathered is None or len(gathered) == 1:
        return local
    return hashlib.sha256("|".join(gathered).encode()).hexdigest()[:16]


def measure_memory(
    device: torch.device, work: Callable[[], object]
) -> tuple[float | None, float | None, str]:
    """`hardware.measure_memory`, the largest rank's figures under torch.distributed.

    A rank cannot fork a measuring worker (the process group's threads do not survive a
    fork), so on CPU each rank measures its own process in place: its freed heap returned to
    the OS and its peak RSS reset before the run.
    """
    world_size = distributed.world()[1]
    if world_size == 1:
        return hardware.measure_memory(device, work)
    if device.type == "cuda":
        peak, delta, source = hardware.measure_memory(device, work)
    else:
        base = hardware.reset_peak_memory(device, return_freed=True)
        work()
        peak, source = hardware.peak_memory_mb(device)[0], MEMORY_IN_PLACE
        delta = None if base is None else peak - base
    known = [-1.0 if v is None else v for v in (peak, delta)]
    peak, delta = (None if v < 0 else v for v in distributed.all_reduce(known, "max"))
    return peak, delta, f"{source}; the largest of {world_size} ranks"
