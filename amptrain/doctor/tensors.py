"""Tensor helpers of the doctor: floating tensors in nested outputs, magnitudes, errors, copies.

Every module's inputs and outputs may be tensors nested in tuples, lists, dicts or a Hugging
Face `ModelOutput`; `map_floats` reaches each floating tensor in them. `magnitudes` gives the
magnitude figures the headroom table is made of, `relative_error` the divergence figures.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from amptrain.doctor.records import FP16_SUBNORMAL, FP16_TINY
from amptrain.errors import ModelError

ROOT = "(model)"
"""How the model itself is named among its modules."""
SAMPLE = 1 << 15
"""Values per tensor sampled for the underflow fractions (the abs max always sees all)."""


def map_floats(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every floating tensor in plain tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_floats(v, fn) for v in obj))
    if type(obj) in (tuple, list):
        return type(obj)(map_floats(v, fn) for v in obj)
    if type(obj) is dict:
        return {k: map_floats(v, fn) for k, v in obj.items()}
    if isinstance(obj, Mapping):  # e.g. a Hugging Face ModelOutput: read, never rebuilt
        for v in obj.values():
            map_floats(v, fn)
    return obj


def float_tensors(obj: Any) -> list[torch.Tensor]:
    """Every floating tensor in `obj`, in `map_floats` order."""
    found: list[torch.Tensor] = []
    map_floats(obj, lambda t: found.append(t) or t)
    return found


def absmax(t: torch.Tensor) -> float:
    """The largest magnitude, in one pass; inf if the tensor holds inf or NaN."""
    if t.numel() == 0:
        return 0.0
    low, high = torch.aminmax(t.detach())  # NaN propagates into both
    value = max(-float(low), float(high))
    return value if math.isfinite(value) else math.inf


def magnitudes(t: torch.Tensor) -> tuple[float, int, int, int]:
    """Abs max, then counts on a strided sample: nonzero, below fp16 normal, below subnormal.

    The abs max sees every value; the counts are only used as fractions, so a sample will do.
    """
    peak = absmax(t)
    if peak == 0 or not math.isfinite(peak):
        return peak, 0, 0, 0
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE) | 1  # odd, so a power-of-two width is not aliased
    a = flat[::step].abs().float()
    zeros = a.numel() - int(torch.count_nonzero(a))
    small = int(torch.count_nonzero(a < FP16_TINY)) - zeros
    tiny = int(torch.count_nonzero(a < FP16_SUBNORMAL)) - zeros
    return peak, a.numel() - zeros, small, tiny


def relative_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    """||value - ref|| / ||ref|| over the finite entries of `ref`; its inf/NaN must match."""
    value, finite = value.detach().float(), torch.isfinite(ref)
    if not torch.equal(value[~finite].nan_to_num(), ref[~finite].nan_to_num()):
        return math.inf
    value, ref = value[finite], ref[finite]
    diff, norm = float((value - ref).norm()), float(ref.norm())
    error = diff / norm if norm > 0 else diff
    return error if math.isfinite(error) else math.inf


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of the user's model, which the doctor works on instead of the model itself."""
    try:
        return copy.deepcopy(model)
    except torch.OutOfMemoryError:
        raise  # not the model's fault: the CLI says how to need less memory
    except Exception as exc:  # the user's model: say why the doctor cannot work on a copy
        raise ModelError(f"the doctor works on a copy of the model, and deepcopy failed: "
                         f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
