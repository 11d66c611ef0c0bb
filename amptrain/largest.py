"""What fits a memory budget: the largest batch, and the deepest model of the model's shape.

Both are measured as `memory_plan` measures a micro-batch: one training step per candidate
with the run's levers (on CPU in a forked probe the kernel's OOM killer may end, on CUDA in
the process), doubling, then bisecting between the last size that fit and the first that did
not. The deepest model is the model with its stack of repeated blocks (`blocks.repeated_blocks`)
replaced by copies of its first block: width, heads and vocabulary kept, depth grown, built
inside the probe. `amptrain bench --memory-budget` asks both of each arm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from amptrain import data as data_mod
from amptrain.blocks import repeated_blocks
from amptrain.config import FitOptions
from amptrain.memory_plan import unprobed_bytes
from amptrain.precision import Precision
from amptrain.step_probe import probe_step

log = logging.getLogger("amptrain")

DEPTH_FACTOR = 16
"""The deepest model tried has this many times the model's own blocks (the answer is then
"at least that")."""


def largest_batch(
    model: nn.Module, blocks: data_mod.Blocks, prec: Precision, opts: FitOptions, budget: int
) -> int | None:
    """The largest batch whose step fits `budget` bytes, or None when one block does not.

    Up to the blocks there are.
    """
    return _largest(_fits(model, blocks, prec, opts, budget), len(blocks))


def largest_depth(
    model: nn.Module,
    blocks: data_mod.Blocks,
    prec: Precision,
    opts: FitOptions,
    budget: int,
    batch: int,
) -> int | None:
    """The most repeated blocks whose step on `batch` blocks fits `budget` bytes.

    Up to `DEPTH_FACTOR` times the model's own depth. None when the model has no stack of
    repeated blocks, when two blocks do not fit, or when a deepened model does not train: its
    forward leaves added blocks out (it counts its layers from its config) or fails (it
    indexes them by a config's count); the reason is logged.
    """
    found = repeated_blocks(model)
    if found is None:
        return None
    fits = _fits(model, blocks, prec, opts, budget)
    most = DEPTH_FACTOR * len(found.blocks)
    try:
        return _largest(lambda depth: fits(batch, depth), most, least=2)  # a stack is 2 or more
    except Exception as exc:  # noqa: BLE001 (any model's forward: the answer is "none")
        log.warning("no deepest model of %s's shape: a deepened copy does not train (%s: %s)",
                    type(model).__name__, type(exc).__name__, exc)  # fmt: skip
        return None


def _fits(
    model: nn.Module, blocks: data_mod.Blocks, prec: Precision, opts: FitOptions, budget: int
) -> Callable[..., bool]:
    """`fits(batch, depth=None)`: whether that step of the run's levers fits `budget`."""
    mode = "none" if opts.activation_checkpointing == "auto" else opts.activation_checkpointing

    def fits(batch: int, depth: int | None = None) -> bool:
        peak = probe_step(model, blocks, prec, opts, batch, mode, depth=depth)
        return peak is not None and peak + unprobed_bytes(model, opts, 1) <= budget

    return fits


def _largest(fits: Callable[[int], bool], most: int, least: int = 1) -> int | None:
    """The largest n in [least, most] with `fits(n)` (assumed monotone), or None."""
    if not fits(least):
        return None
    low, high = least, None  # low fits; high (when known) does not
    while high is None and low * 2 <= most:
        if fits(low * 2):
            low *= 2
        else:
            high = low * 2
    high = high or most + 1
    while high - low > 1:  # between the last power of two that fit and the first that did not
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
