"""The doctor's measuring machinery: module hooks, fp32 reference passes and AMP passes.

Hooks record, per module, the absolute maximum and under-/overflow counts of outputs and of
loss-scaled gradients; a reference recorder feeds every module its fp32 inputs so each AMP
error is that module's own. `_measure` runs the passes that `doctor()` reports on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from amptrain.adapter import count_targets, forward_logits, next_token_loss
from amptrain.doctor.records import (
    FP16_SUBNORMAL,
    FP16_TINY,
    Divergence,
    FirstNonfinite,
    LayerHeadroom,
    headroom_bits,
)
from amptrain.errors import ModelError
from amptrain.precision import resolve

log = logging.getLogger("amptrain")


ROOT = "(model)"
"""How the model itself is named among its modules."""
AMP = ("fp16", "bf16")
SAMPLE = 1 << 15
"""Values per tensor sampled for the underflow fractions (the abs max always sees all)."""


class _Tap(torch.autograd.Function):
    """Identity forward; hands the gradient arriving at a module's input to a callback."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, callback: Callable) -> torch.Tensor:
        ctx.callback = callback
        return x.clone()  # not a view: the module may modify its input in place

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.callback(grad)
        return grad, None


def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every floating tensor in plain tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map(v, fn) for v in obj))
    if type(obj) in (tuple, list):
        return type(obj)(_map(v, fn) for v in obj)
    if type(obj) is dict:
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, Mapping):  # e.g. a Hugging Face ModelOutput: read, never rebuilt
        for v in obj.values():
            _map(v, fn)
    return obj


def _floats(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map(obj, lambda t: found.append(t) or t)
    return found


def _absmax(t: torch.Tensor) -> float:
    """The largest magnitude, in one pass; inf if the tensor holds inf or NaN."""
    if t.numel() == 0:
        return 0.0
    low, high = torch.aminmax(t.detach())  # NaN propagates into both
    value = max(-float(low), float(high))
    return value if math.isfinite(value) else math.inf


def _scan(t: torch.Tensor) -> tuple[float, int, int, int]:
    """Abs max, then counts on a strided sample: nonzero, below fp16 normal, below subnormal.

    The abs max sees every value; the counts are only used as fractions, so a sample will do.
    """
    absmax = _absmax(t)
    if absmax == 0 or not math.isfinite(absmax):
        return absmax, 0, 0, 0
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE) | 1  # odd, so a power-of-two width is not aliased
    a = flat[::step].abs().float()
    zeros = a.numel() - int(torch.count_nonzero(a))
    small = int(torch.count_nonzero(a < FP16_TINY)) - zeros
    tiny = int(torch.count_nonzero(a < FP16_SUBNORMAL)) - zeros
    return absmax, a.numel() - zeros, small, tiny


def _rel(value: torch.Tensor, ref: torch.Tensor) -> float:
    """||value - ref|| / ||ref|| over the finite entries of `ref`; its inf/NaN must match."""
    value, finite = value.detach().float(), torch.isfinite(ref)
    if not torch.equal(value[~finite].nan_to_num(), ref[~finite].nan_to_num()):
        return math.inf
    value, ref = value[finite], ref[finite]
    diff, norm = float((value - ref).norm()), float(ref.norm())
    error = diff / norm if norm > 0 else diff
    return error if math.isfinite(error) else math.inf


@dataclasses.dataclass
class _Acc:
    """Running figures of one module over the passes of one recorder."""

    kind: str
    forward_order: int | None = None
    backward_order: int | None = None
    act: list = dataclasses.field(default_factory=lambda: [0.0, 0, 0, 0])
    grad: list | None = None
    dtype: str = ""
    finite: bool = True
    grad_finite: bool | None = None
    drift: float = 0.0
    error: float = 0.0
    input_error: float = 0.0


def _merge(into: list, scan: tuple[float, int, int, int]) -> None:
    into[0] = max(into[0], scan[0])
    for i in (1, 2, 3):
        into[i] += scan[i]


class _Ref:
    """The fp32 pass's inputs and outputs of every module call, and its parameter gradients."""

    def __init__(self) -> None:
        self.inputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self._clones: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._norms: dict[int, float] = {}

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        # One copy per tensor state: the residual stream feeds many modules, and an in-place
        # op (which bumps `_version`) makes the same tensor object a new value.
        key = (id(t), t._version)
        if key not in self._clones:
            clone = t.detach().clone()
            self._norms[id(clone)] = float(torch.linalg.vector_norm(clone))  # inf/NaN: see error
            self._clones[key] = (t, clone)
        return self._clones[key][1]

    def done(self) -> None:
        self._clones.clear()

    def error(self, value: torch.Tensor, ref: torch.Tensor) -> float:
        """||value - ref|| / ||ref||, where `ref` was kept here."""
        norm = self._norms[id(ref)]
        if not math.isfinite(norm):  # an attention mask with -inf, say
            return _rel(value, ref)
        diff = float(torch.dist(value.detach().to(ref.dtype), ref))
        error = diff / norm if norm > 0 else diff
        return error if math.isfinite(error) else math.inf


class _Recorder:
    """Hooks on every module, in one of three modes.

    `measure`: fp32 magnitudes of outputs and gradients, storing `ref` on the first batch;
    `free`: an AMP pass, its outputs compared with `ref`; `forced`: an AMP pass whose module
    inputs and outputs are replaced by the fp32 ones, so each module's error is its own.
    """

    def __init__(self, mode: str, ref: _Ref | None = None) -> None:
        self.mode, self.ref = mode, ref
        self.acc: dict[str, _Acc] = {}
        self.first_forward: str | None = None
        self.first_backward: str | None = None
        self._calls: Counter = Counter()
        self._outputs = itertools.count()
        self._grads = itertools.count()

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        handles, owners = [], {}
        for name, module in model.named_modules():
            name = name or ROOT
            pre = functools.partial(self._pre, name)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(functools.partial(self._post, name)))
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), (p, []))[1].append(name)
        for p, names in owners.values():
            if p.requires_grad and self.mode != "forced":
                handles.append(p.register_hook(functools.partial(self._grad, tuple(names))))
        self._calls.clear()
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _pre(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        acc = self.acc.setdefault(name, _Acc(type(module).__name__))
        call = (name, self._calls[name])
        self._calls[name] += 1
        if self.mode == "forced":
            refs = iter(self.ref.inputs.get(call, []))
            inputs = _floats((args, kwargs))
            if len(inputs) != len(self.ref.inputs.get(call, [])):
                return None
            for t, r in zip(inputs, self.ref.inputs[call]):
                acc.input_error = max(acc.input_error, self.ref.error(t, r))
            return _map((args, kwargs), lambda t: next(refs).to(t.dtype, copy=True))
        if self.mode == "measure" and self.ref is not None:
            self.ref.inputs[call] = [self.ref.keep(t) for t in _floats((args, kwargs))]
        if not torch.is_grad_enabled():
            return None
        tap = functools.partial(self._grad, (name,))
        return _map((args, kwargs), lambda t: _Tap.apply(t, tap) if t.requires_grad else t)

    def _post(self, name: str, module: nn.Module, args: tuple, output: Any) -> Any:
        acc, outs = self.acc[name], _floats(output)
        if not outs:
            return None
        call = (name, self._calls[name] - 1)
        if acc.forward_order is None:
            acc.forward_order, acc.dtype = next(self._outputs), str(outs[0].dtype)[6:]
        if self.mode == "measure":
            for t in outs:
                _merge(acc.act, _scan(t))
            self._forward_seen(acc, name, math.isfinite(acc.act[0]))
            if self.ref is not None:
                self.ref.outputs[call] = [self.ref.keep(t) for t in outs]
            return None
        refs = self.ref.outputs.get(call) if self.ref is not None else None
        if refs is None or len(refs) != len(outs):
            self._forward_seen(acc, name, all(math.isfinite(_absmax(t)) for t in outs))
            return None
        error = max(self.ref.error(t, r) for t, r in zip(outs, refs))
        # A finite error implies finite outputs: the costly check runs only when it is not.
        finite = math.isfinite(error) or all(math.isfinite(_absmax(t)) for t in outs)
        self._forward_seen(acc, name, finite)
        if self.mode == "free":
            acc.drift = max(acc.drift, error)
            return None
        acc.error = max(acc.error, error)
        it = iter(refs)
        return _map(output, lambda t: next(it).to(t.dtype, copy=True))

    def _forward_seen(self, acc: _Acc, name: str, finite: bool) -> None:
        acc.finite &= finite
        if not finite and self.first_forward is None:
            self.first_forward = name

    def _grad(self, names: tuple[str, ...], grad: torch.Tensor) -> None:
        scan = _scan(grad) if self.mode == "measure" else None
        finite = math.isfinite(scan[0] if scan else _absmax(grad))
        seq = next(self._grads)
        for name in names:
            acc = self.acc.get(name)
            if acc is None:
                continue
            if acc.backward_order is None:
                acc.backward_order = seq
            acc.grad_finite = finite and acc.grad_finite is not False
            if self.mode == "measure":
                acc.grad = acc.grad or [0.0, 0, 0, 0]
                _merge(acc.grad, scan)
        if not finite and self.first_backward is None:
            self.first_backward = names[0]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The same dropout masks in every pass, without touching the caller's RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclasses.dataclass(frozen=True)
class _Setup:
    seed: int
    ignore_index: int
    loss_scale: float


def _pass(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    rec: _Recorder,
    autocast: contextlib.AbstractContextManager,
    scale: float,
    setup: _Setup,
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
class _Measured:
    fp32: _Recorder
    free: dict[str, _Recorder]
    forced: dict[str, _Recorder]
    losses: dict[str, float]
    grad_errors: dict[str, dict[str, float]]
    finite_losses: dict[str, bool]


def _measure(work: nn.Module, sample: list, arms: list[str], setup: _Setup) -> _Measured:
    """The fp32 pass on every batch, the AMP passes (fp16 on every batch), the forced passes."""
    device, ref = sample[0][0].device, _Ref()
    out = _Measured(_Recorder("measure", ref), {}, {}, {}, {}, {})
    precs = {name: resolve(name, device) for name in dict.fromkeys(["fp16", *arms])}
    for i, batch in enumerate(sample):
        out.fp32.ref = ref if i == 0 else None
        loss = _pass(work, batch, out.fp32, contextlib.nullcontext(), setup.loss_scale, setup)
        out.losses.setdefault("fp32", loss)
        if i == 0:
            ref.done()
            ref.grads = {id(p): p.grad.detach().float() / setup.loss_scale
                         for p in work.parameters() if p.grad is not None}  # fmt: skip
        for name, prec in precs.items():
            if i and name != "fp16":
                continue
            rec = out.free.setdefault(name, _Recorder("free"))
            rec.ref = ref if i == 0 else None
            scale = setup.loss_scale if name == "fp16" else 1.0
            loss = _pass(work, batch, rec, prec.autocast(), scale, setup)
            out.finite_losses[name] = out.finite_losses.get(name, True) and math.isfinite(loss)
            if i == 0:
                out.losses[name] = loss
                out.grad_errors[name] = _grad_errors(work, ref.grads, scale)
    for name in arms:
        out.forced[name] = _Recorder("forced", ref)
        _pass(work, sample[0], out.forced[name], precs[name].autocast(), 1.0, setup, False)
    work.zero_grad(set_to_none=True)
    return out


def _fraction(counts: list | None, i: int) -> float | None:
    return None if counts is None else counts[i] / max(counts[1], 1)


def _layers(m: _Measured) -> tuple[LayerHeadroom, ...]:
    rows, fp16 = [], m.free["fp16"].acc
    for name, a in m.fp32.acc.items():
        if a.forward_order is None:  # never called, or no floating output
            continue
        f = fp16.get(name) or _Acc("")
        g_max = None if a.grad is None else a.grad[0]
        rows.append(LayerHeadroom(
            name, a.kind, a.forward_order, a.backward_order, a.act[0], headroom_bits(a.act[0]),
            _fraction(a.act, 2), _fraction(a.act, 3), g_max,
            None if g_max is None else headroom_bits(g_max), _fraction(a.grad, 2),
            _fraction(a.grad, 3), f.dtype, f.finite, f.grad_finite,
        ))  # fmt: skip
    return tuple(rows)


def _firsts(m: _Measured, loss_scale: float) -> tuple[FirstNonfinite, ...]:
    out = []
    for name, rec in m.free.items():
        # Once the loss is inf/NaN every gradient is; the backward culprit is then meaningless.
        backward = rec.first_backward if m.finite_losses[name] else None
        scale = loss_scale if name == "fp16" else 1.0
        out.append(FirstNonfinite(name, rec.first_forward, backward, m.losses[name], scale))
    return tuple(out)


def _divergence(m: _Measured, arms: list[str]) -> tuple[Divergence, ...]:
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


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # the user's model: say why the doctor cannot work on a copy
        raise ModelError(f"the doctor works on a copy of the model, and deepcopy failed: "
                         f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
