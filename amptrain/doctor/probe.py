"""The doctor's passes: the fp32 reference, the AMP passes, the forced passes, and their tables.

`measure` runs the passes that `doctor()` reports on, each on a copy of the model with a
`Recorder` attached; `headroom_rows`, `first_nonfinite` and `divergence_rows` turn what the
recorders saw into the report's records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import nn

from amptrain.adapter import count_targets, forward_logits, next_token_loss
from amptrain.doctor.recorder import ModuleFigures, Recorder, Reference
from amptrain.doctor.records import Divergence, FirstNonfinite, LayerHeadroom, headroom_bits
from amptrain.doctor.tensors import ROOT
from amptrain.precision import resolve

AMP = ("fp16", "bf16")
"""The AMP precisions the doctor compares with fp32."""


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The same dropout masks in every pass, without touching the caller's RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every pass shares: the dropout seed, the ignored label and the fp16 loss scale."""

    seed: int
    ignore_index: int
    loss_scale: float


def run_pass(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    rec: Recorder,
    autocast: contextlib.AbstractContextManager,
    scale: float,
    setup: Setup,
    backward: bool = True,
) -> float:
    """One forward (and backward on `loss * scale`) with `rec` attached; returns the loss."""
    x, y = batch
    model.zero_grad(set_to_none=True)
    grad_mode = torch.enable_grad() if backward else torch.no_grad()
    with _seeded(setup.seed, x.device), rec.attached(model), grad_mode:
        with autocast:
            logits = forward_logits(model, x, y)
            targets = max(count_targets(y, setup.ignore_index), 1)
            loss = next_token_loss(logits, y, setup.ignore_index) / targets
        if backward:
            (loss * scale).backward()
    return float(loss.detach())


def _grad_errors(model: nn.Module, ref: dict[int, torch.Tensor], scale: float) -> dict[str, float]:
    """Per module, the relative error of its own parameters' gradients against fp32's."""
    errors = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in ref]
        if own:
            diff = norm = 0.0
            for p in own:
                r = ref[id(p)]
                g = p.grad.float() / scale if p.grad is not None else torch.zeros_like(r)
                diff, norm = diff + float(torch.dist(g, r)) ** 2, norm + float(r.norm()) ** 2
            error = math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)
            errors[name or ROOT] = error if math.isfinite(error) else math.inf
    return errors


@dataclasses.dataclass
class Measured:
    """The recorders of every pass, the first batch's losses and gradient errors per precision."""

    fp32: Recorder
    free: dict[str, Recorder]
    forced: dict[str, Recorder]
    losses: dict[str, float]
    grad_errors: dict[str, dict[str, float]]
    finite_losses: dict[str, bool]


def measure(work: nn.Module, sample: list, arms: list[str], setup: Setup) -> Measured:
    """The fp32 pass on every batch, the AMP passes (fp16 on every batch), the forced passes."""
    device, ref = sample[0][0].device, Reference()
    out = Measured(Recorder("measure", ref), {}, {}, {}, {}, {})
    precs = {name: resolve(name, device) for name in dict.fromkeys(["fp16", *arms])}
    for i, batch in enumerate(sample):
        out.fp32.ref = ref if i == 0 else None
        loss = run_pass(work, batch, out.fp32, contextlib.nullcontext(), setup.loss_scale, setup)
        out.losses.setdefault("fp32", loss)
        if i == 0:
            ref.done()
            ref.grads = {id(p): p.grad.detach().float() / setup.loss_scale
                         for p in work.parameters() if p.grad is not None}  # fmt: skip
        for name, prec in precs.items():
            if i and name != "fp16":
                continue
            rec = out.free.setdefault(name, Recorder("free"))
            rec.ref = ref if i == 0 else None
            scale = setup.loss_scale if name == "fp16" else 1.0
            loss = run_pass(work, batch, rec, prec.autocast(), scale, setup)
            out.finite_losses[name] = out.finite_losses.get(name, True) and math.isfinite(loss)
            if i == 0:
                out.losses[name] = loss
                out.grad_errors[name] = _grad_errors(work, ref.grads, scale)
    for name in arms:
        out.forced[name] = Recorder("forced", ref)
        run_pass(work, sample[0], out.forced[name], precs[name].autocast(), 1.0, setup, False)
    work.zero_grad(set_to_none=True)
    return out


def _fraction(counts: list | None, i: int) -> float | None:
    return None if counts is None else counts[i] / max(counts[1], 1)


def headroom_rows(m: Measured) -> tuple[LayerHeadroom, ...]:
    """Per module called, its fp32 magnitudes and headroom, and whether fp16 stayed finite."""
    rows, fp16 = [], m.free["fp16"].acc
    for name, a in m.fp32.acc.items():
        if a.forward_order is None:  # never called, or no floating output
            continue
        f = fp16.get(name) or ModuleFigures("")
        g_max = None if a.grad is None else a.grad[0]
        rows.append(LayerHeadroom(
            name, a.kind, a.forward_order, a.backward_order, a.act[0], headroom_bits(a.act[0]),
            _fraction(a.act, 2), _fraction(a.act, 3), g_max,
            None if g_max is None else headroom_bits(g_max), _fraction(a.grad, 2),
            _fraction(a.grad, 3), f.dtype, f.finite, f.grad_finite,
        ))  # fmt: skip
    return tuple(rows)


def first_nonfinite(m: Measured, loss_scale: float) -> tuple[FirstNonfinite, ...]:
    """Per AMP precision, the first module whose output, then gradient, became inf/NaN."""
    out = []
    for name, rec in m.free.items():
        # Once the loss is inf/NaN every gradient is; the backward culprit is then meaningless.
        backward = rec.first_backward if m.finite_losses[name] else None
        scale = loss_scale if name == "fp16" else 1.0
        out.append(FirstNonfinite(name, rec.first_forward, backward, m.losses[name], scale))
    return tuple(out)


def divergence_rows(m: Measured, arms: list[str]) -> tuple[Divergence, ...]:
    """Per precision and module, its own error against fp32, the largest first."""
    rows = []
    for name in arms:
        free = m.free[name].acc
        for module, a in m.forced[name].acc.items():
            if a.forward_order is None:
                continue
            drift = free[module].drift if module in free else math.nan
            grad = m.grad_errors[name].get(module)
            rows.append(Divergence(name, module, a.error, a.input_error, drift, grad))
    return tuple(sorted(rows, key=lambda d: -d.error if not math.isnan(d.error) else -math.inf))
