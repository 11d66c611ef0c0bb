"""The doctor's audit of a training set-up, and the fp32 wrapper that `--fix` applies.

`audit` takes one real optimizer step on a copy, through the training loop's own
`train_step` (the same loss normalisation, unscale, clipping and scaler update), and reports
the dtypes of parameters, gradients and optimizer state, whether autocast lowers matmuls, the
scaler, TF32 flags and whether bf16 is fast here (capability probe table included).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from amptrain import capability, tf32
from amptrain.config import FitOptions
from amptrain.doctor.records import (
    Audit,
)
from amptrain.doctor.tensors import ROOT, copy_model, float_tensors, map_floats
from amptrain.errors import ModelError
from amptrain.optim import make_optimizer, make_scheduler
from amptrain.precision import Precision, resolve
from amptrain.step import train_step

log = logging.getLogger("amptrain")


def bf16_speed(device: torch.device) -> tuple[bool, str, dict | None]:
    """Whether bf16 is fast here, by the capability probe: `(fast, why, probe table)`."""
    if device.type not in ("cpu", "cuda"):
        return False, f"no bf16 rule for device type {device.type!r}", None
    caps = capability.probe(device)
    if "bf16" not in caps.tflops:
        cc = "sm_{}{}".format(*(caps.compute_capability or (0, 0)))
        why = (
            f"{caps.name} ({cc}) has no bf16 matmuls (they need compute capability 8.0); "
            f"fp16 with loss scaling is its mixed precision: {caps.figures('fp16')}"
        )
        return False, why, caps.to_dict()
    if caps.emulated("bf16"):
        return False, f"bf16 is emulated here: {caps.figures('bf16')}", caps.to_dict()
    fast = caps.clearly_faster("bf16")
    verb = "is fast here" if fast else "is not clearly faster than fp32 here"
    return fast, f"bf16 {verb}: {caps.figures('bf16')}", caps.to_dict()


def _dtypes(tensors: Iterator[torch.Tensor]) -> dict[str, int]:
    return dict(Counter(str(t.dtype)[6:] for t in tensors))


def audit(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    precision: str | Precision = "auto",
    lr: float = 1e-3,
    ignore_index: int = -100,
) -> Audit:
    """One real training step (`step.train_step`) on a copy of `model`, and what it used.

    Args:
        model: The model as the user has it (its own dtypes); it is not changed.
        batch: `(inputs, labels)` on the model's device.
        precision: The precision trained with (a name or a `Precision`).
        lr: Learning rate of the step.
        ignore_index: Label value the loss ignores.

    Returns:
        An `Audit`: dtypes of parameters, gradients and optimizer state, output dtypes of every
        nn.Linear/conv call under autocast, the scaler, TF32 flags, whether bf16 is fast here.
        A failing step (a half-precision model under fp16 AMP) is recorded in `step_error`.
    """
    device = next(model.parameters()).device
    given = resolve(precision, device)
    prec = resolve(given.name, device, init_scale=given.loss_scale)  # a fresh scaler
    work = copy_model(model).train()
    opts = FitOptions(lr=lr, ignore_index=ignore_index)
    optimizer = make_optimizer(work, opts)
    matmuls: Counter = Counter()
    grads: Counter = Counter()  # read as each gradient is complete: the step frees them after
    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    handles = [
        m.register_forward_hook(lambda mod, args, out: matmuls.update(_dtypes(float_tensors(out))))
        for m in work.modules() if isinstance(m, kinds)
    ]  # fmt: skip
    handles += [p.register_post_accumulate_grad_hook(lambda p: grads.update(_dtypes([p.grad])))
                for p in work.parameters() if p.requires_grad]  # fmt: skip
    step_error = None
    try:
        with prec.activate():  # the GradScaler refuses fp16 gradients in the step's unscale_
            train_step(work, [batch], prec, optimizer, make_scheduler(optimizer, opts), opts)
    except torch.OutOfMemoryError:
        raise  # not a finding about the set-up: the CLI says how to need less memory
    except (ValueError, RuntimeError) as exc:
        step_error = f"{type(exc).__name__}: {exc}"
    finally:
        for handle in handles:
            handle.remove()
    state = (v for s in optimizer.state.values() for k, v in s.items() if k != "step")
    fast, why, probe = bf16_speed(device)
    return Audit(
        prec.name, given.reason, str(device), _dtypes(work.parameters()), dict(grads),
        _dtypes(v for v in state if isinstance(v, torch.Tensor)), dict(matmuls),
        prec.scaler.is_enabled(), prec.loss_scale, step_error, tf32.flags(), fast, why, probe,
    )  # fmt: skip


class Float32(nn.Module):
    """Runs the wrapped module in fp32 under a disabled autocast region (the `--fix` wrapper)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.float()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Cast floating inputs to fp32, then call the module with autocast off."""
        args, kwargs = map_floats((args, kwargs), lambda t: t.float())
        tensors = float_tensors((args, kwargs)) or list(self.inner.parameters())
        device_type = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type, enabled=False):
            return self.inner(*args, **kwargs)


def wrap_fp32(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Make the named modules of `model` run in fp32 under a disabled autocast region.

    This changes `model` in place (pass a `copy.deepcopy` to keep the original); the wrapped
    modules' parameters are cast to fp32 and move under `<name>.inner` in the state dict.

    Args:
        model: The model to change.
        names: Module names as `model.named_modules()` gives them; `(model)` wraps it whole.

    Returns:
        `model`, or a `Float32` around it when `(model)` is named.

    Raises:
        ModelError: If a name is not a module of `model`.
    """
    if ROOT in names or "" in names:
        return Float32(model)
    for name in sorted(names, key=lambda n: -n.count(".")):  # deepest first: paths stay valid
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            setattr(parent, child, Float32(parent.get_submodule(child)))
        except AttributeError:
            known = [n for n, _ in model.named_modules() if n][:8]
            raise ModelError(
                f"wrap_fp32: {name!r} is not a module of the model; modules are named like {known}"
            ) from None
    return model
