"""FSDP2's DTensor shards, as an optimizer that steps each process's rows sees them.

FSDP2 (`sharding`) shards every parameter on dim 0: each process holds whole rows, in rank
order, `torch.chunk`'s way. amptrain's own AdamW (`stochastic_round`) updates the local rows
and keeps its state as DTensors laid out as the parameter, so torch's distributed checkpoint
saves, gathers and reshards the state with the weights.
"""

from __future__ import annotations

import torch


def is_shard(value: torch.Tensor) -> bool:
    """True for a DTensor: a parameter, or its state, sharded by FSDP2."""
    if not torch.distributed.is_available():  # a torch built without it has no DTensor
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def local_part(value: torch.Tensor) -> torch.Tensor:
    """This process's part of `value`: its local shard under FSDP2 (a DTensor), else itself."""
    return value.to_local() if is_shard(value) else value


def shard_like(param: torch.Tensor, local: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`local` as a shard of a tensor of `shape` laid out as `param` is (DTensor), or itself.

    Optimizer state held as DTensors is saved, gathered and resharded by torch's distributed
    checkpoint with the parameters'.
    """
    if not is_shard(param):
        return local
    from torch.distributed.tensor import DTensor

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)  # fmt: skip


def first_row(param: torch.Tensor) -> int:
    """The index of the first row of this process's shard of `param` (0 for a whole tensor).

    FSDP2 shards dim 0 in `torch.chunk`'s way: ceil(rows / processes) rows each, in rank order.
    """
    if not is_shard(param):
        return 0
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"amptrain steps shards of dim 0 on one mesh dimension, not "
                         f"{param.placements}")  # fmt: skip
    mesh = param.device_mesh
    return mesh.get_local_rank() * -(-param.shape[0] // mesh.size())
