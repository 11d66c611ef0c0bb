"""How several processes share a model: DDP replicas, or FSDP2 shards (`fully_shard`).

Under `strategy="fsdp"` every repeated block of the model (found by `blocks.repeated_blocks`)
becomes one `fully_shard` unit, then the root takes what is left (embeddings, final norm,
head). Each rank then holds 1/N of the parameters, of their gradients and of AdamW's two
moments; a block's parameters are gathered just before its forward and backward and freed
after.

Precision changes under sharding. `bf16` and `fp16` gather the blocks' parameters in the low
dtype (`MixedPrecisionPolicy(param_dtype=...)`: half the all-gather traffic and unsharded
memory) and reduce the gradients in fp32 (a sum over many ranks keeps its precision); the
sharded fp32 parameters stay the master copy. What autocast leaves in fp32 stays fp32 under
the policy too, so that FSDP trains as one process does: the root's parameters (embeddings,
the final norm, the head, which autocast casts itself for its matmul) and every norm inside
a block are units of their own gathered in fp32, and a block's inputs are not cast (the
residual stream stays fp32, as under autocast). Only the blocks' other weights (the matrices
and biases autocast would cast for each matmul anyway) are gathered in the low dtype.

With bf16 weights (`--precision bf16-true`, cast by `low_weights` before sharding) the blocks'
units hold bf16 parameters, gathered as they are, with gradients reduce-scattered in fp32
and rounded once per shard; the norms and embeddings stay fp32 units as above, and a bf16
layer outside the blocks (an untied head) is a unit of its own, since FSDP2 gathers a unit in
one dtype.

fp16 keeps torch's own `GradScaler`: a reduce-scatter leaves an overflow in the shard of one
rank only, and the scaler's found-inf check on the
sharded (DTensor) gradients is reduced with a max over the ranks by DTensor itself (its
`found_inf_reduce_handler`, in torch since 2.6), so every rank skips the same steps and backs
off the same scale (`tests/test_fsdp.py` checks it). torch's `ShardedGradScaler` would
all-reduce the flag a second time and refuses the fused AdamW. fp32 and tf32 need no policy.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from amptrain.blocks import kept_in_fp32, repeated_blocks
from amptrain.errors import ModelError
from amptrain.precision import Precision

log = logging.getLogger("amptrain")

_POLICY_REASON = {
    "bf16": "the blocks' matrices gathered in bf16 (half their all-gather traffic and unsharded "
    "memory), gradients reduced in fp32 (sums over ranks keep their precision); embeddings, "
    "head and norms gathered in fp32 and the residual stream left fp32, as autocast keeps "
    "them in one process",
    "fp16": "the blocks' matrices gathered in fp16 (embeddings, head and norms in fp32), "
    "gradients reduced in fp32; the GradScaler's "
    "found-inf flag on the sharded gradients is max-reduced over the ranks (DTensor), so "
    "every rank skips the same steps",
}


def check_shardable(model: nn.Module, strategy: str, source: str) -> None:
    """Refuse, before any work, a model that `strategy` cannot shard.

    Raises:
        ModelError: Under `fsdp`, when the model has no stack of repeated blocks.
    """
    if strategy == "fsdp" and repeated_blocks(model) is None:
        raise ModelError(
            f"{source} ({type(model).__name__}) cannot be sharded with strategy 'fsdp': it has "
            "no stack of repeated blocks (an nn.ModuleList or nn.Sequential of two or more "
            "children of one class) to make the sharding units; hold the blocks in an "
            "nn.ModuleList, or use strategy 'ddp'"
        )


def will_shard(strategy: str, world_size: int) -> bool:
    """True when `shard` shards: strategy `fsdp` on more than one process."""
    return strategy == "fsdp" and world_size > 1


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `value`: the whole of a DTensor (a norm over sharded gradients)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def holds_shards(optimizer: torch.optim.Optimizer) -> bool:
    """True when the optimizer's parameters are DTensor shards (a model under `fully_shard`).

    `shard` shards every parameter or none, so the first one tells: the step asks each time.
    """
    from torch.distributed.tensor import DTensor

    return isinstance(optimizer.param_groups[0]["params"][0], DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True when `fully_shard` was applied to `model`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module, prec: Precision, strategy: str, world_size: int) -> dict[str, Any]:
    """Apply `fully_shard` per repeated block and to the root, in place, under `fsdp`.

    Returns the record of what was done and why (for the fast-path record and summary.json).
    Under `ddp`, or in one process, nothing changes and the record says so. With bf16 weights
    (`low_weights.cast` runs first) the blocks' units hold bf16 parameters, gathered as they
    are, and a bf16 layer outside the blocks (an untied head) is a unit of its own.

    Raises:
        ModelError: When a unit would hold parameters of two dtypes (FSDP2 gathers one).
    """
    if not will_shard(strategy, world_size):
        why = "one process: nothing to shard" if world_size == 1 else "replicas (DDP)"
        return {"strategy": strategy, "sharded": False, "reason": why}
    from torch.distributed.fsdp import MixedPrecisionPolicy

    found = repeated_blocks(model)
    assert found is not None, "check_shardable runs first"
    units = f"{len(found.blocks)} x {found.block_class} ({found.path}) + root"  # before the
    # class swap: fully_shard turns a Block into an FSDPBlock
    policy = keep = MixedPrecisionPolicy()
    if prec.uses_autocast:  # the blocks' matrices low, what autocast keeps fp32 in fp32
        policy = MixedPrecisionPolicy(param_dtype=prec.dtype, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False)  # fmt: skip
        keep = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    kept, done, shared = 0, set(), _shared(model)
    for block in found.blocks:
        for layer in _kept(block, shared) if prec.uses_autocast else ():
            if id(layer) not in done:  # a layer shared by blocks is one unit
                _unit(layer, keep)
                done.add(id(layer))
                kept += 1
        _unit(block, policy)
    low = _low_outside(model)  # bf16 weights: an untied head, say
    for layer in low:
        _unit(layer, policy)
    _unit(model, keep)
    if kept:
        units += f", {kept} fp32 layers (norms, embeddings)"
    if low:
        units += f", {len(low)} bf16 layers outside the blocks"
    record = {
        "strategy": "fsdp", "sharded": True, "world_size": world_size,
        "units": units,
        "param_dtype": str(policy.param_dtype or torch.float32).removeprefix("torch."),
        "param_dtype_of": "the blocks' matrices and biases" if prec.uses_autocast
        else "every parameter",
        "reduce_dtype": str(policy.reduce_dtype or torch.float32).removeprefix("torch."),
        "reason": _POLICY_REASON.get(prec.name, f"{prec.name}: no mixed-precision policy"),
    }  # fmt: skip
    log.info("sharding: %s", record)
    return record


def _unit(module: nn.Module, policy: Any) -> None:
    """`fully_shard(module)`, refusing first a unit of two dtypes (FSDP2 gathers one).

    FSDP2 itself finds out only at the first forward, with an assertion.

    Raises:
        ModelError: Naming the unit, its dtypes and a parameter of each.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    inner = {id(p) for m in module.modules() if m is not module and isinstance(m, FSDPModule)
             for p in m.parameters()}  # fmt: skip
    held = {}
    for name, param in module.named_parameters():
        if id(param) not in inner and param.requires_grad:  # FSDP2 checks the trained ones
            held.setdefault(param.dtype, name)
    if len(held) > 1:
        said = ", ".join(f"{str(d)[6:]} ({n})" for d, n in held.items())
        raise ModelError(
            f"FSDP2 cannot shard {type(module).__name__} as one unit: it holds {said} "
            "parameters (a parameter shared with a norm or an embedding, or one the model "
            "holds itself beside bf16 layers), and FSDP2 gathers a unit in one dtype; train "
            "with --precision bf16, or --strategy ddp"
        )
    fully_shard(module, mp_policy=policy)


def _kept(block: nn.Module, shared: set[int]) -> list[nn.Module]:
    """The layers in a block that hold parameters and stay fp32, innermost first.

    Norms and embeddings (`blocks.kept_in_fp32`): autocast runs them in fp32.

    A layer whose parameters another module shares stays in the block's unit (its tie kept).
    """
    found = [m for m in block.modules() if m is not block and kept_in_fp32(m)
             and any(True for _ in m.parameters(recurse=False))]  # fmt: skip
    return [m for m in reversed(found) if not any(id(p) in shared for p in m.parameters())]


def _low_outside(model: nn.Module) -> list[nn.Module]:
    """The outermost layers outside the sharded blocks whose parameters are all bf16.

    bf16 weights' untied head, say: each is a unit of its own, since the root keeps the
    embeddings and the final norm in fp32. Called after the blocks are units.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    found: list[nn.Module] = []
    taken: set[int] = set()
    for module in model.modules():  # parents before children: the outermost is taken
        if module is model or id(module) in taken:
            continue
        if any(isinstance(m, FSDPModule) for m in module.modules()):  # a block, or holds one
            continue
        held = list(module.parameters())
        if any(isinstance(p, DTensor) for p in held):  # inside a block: its unit has it
            continue
        if held and all(p.dtype == torch.bfloat16 for p in held):
            found.append(module)
            taken.update(id(m) for m in module.modules())
    return found


def _shared(model: nn.Module) -> set[int]:
    """The ids of parameters reachable from more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def wrap(model: nn.Module, world_size: int) -> nn.Module:
    """The module the training step calls: itself (one process, or sharded), else DDP."""
    if world_size == 1 or is_sharded(model):
        return model
    device = next(model.parameters()).device
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def deferred_sync(net: nn.Module, defer: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction of a micro-batch that is not the last of its window.

    DDP has `no_sync()`; FSDP2 a flag (`set_requires_gradient_sync`), which also leaves the
    unsharded gradients to accumulate in the reduce dtype until the last micro-batch.
    """
    if isinstance(net, DDP):
        return net.no_sync() if defer else contextlib.nullcontext()
    if is_sharded(net):
        net.set_requires_gradient_sync(not defer)
    return contextlib.nullcontext()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU; under FSDP gathered (collective: every rank calls).

    Ranks other than 0 get an empty dict under FSDP, so `model.pt` is one full state dict that
    `eval`, `generate`, `compare` and `--init-from` load unchanged. Trained parameters that
    bf16 weights left in bf16 shards are widened to fp32 (exact), as one process's are.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    return {name: value.float() if name in trained and value.dtype == torch.bfloat16 else value
            for name, value in state.items()}  # fmt: skip
