"""AMP diagnosis: which layer overflows fp16, which layer loses precision, and is AMP on at all.

`doctor(model, data)` works on copies of the model, never on the model itself. On real batches
it hooks every module and measures, in fp32, the magnitudes fp16 would have to hold (outputs
and loss-scaled gradients), then runs the same batches under fp16 autocast to name the first
module whose output or gradient becomes inf/NaN. On one batch it compares each AMP precision
with fp32 module by module, feeding every module the fp32 inputs so that each error is that
module's own. One real optimizer step audits dtypes, autocast and the scaler. With `fix=True`
the flagged modules of a copy run in fp32 and the fp16 check is repeated.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from amptrain import data as data_mod
from amptrain.adapter import count_targets, extract_logits, next_token_loss
from amptrain.config import FitOptions, TrainConfig
from amptrain.doctor_report import (
    FP16_SUBNORMAL,
    FP16_TINY,
    Audit,
    Divergence,
    DoctorReport,
    FirstNonfinite,
    FixResult,
    LayerHeadroom,
    diagnose,
    headroom_bits,
    verdict,
)
from amptrain.errors import ConfigError, ModelError
from amptrain.loop import check_data
from amptrain.optim import make_optimizer
from amptrain.precision import Precision, cpu_bf16_features, normalize, resolve

__all__ = ["DoctorReport", "Float32", "audit", "doctor", "wrap_fp32"]

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
            logits = extract_logits(model(x))
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


def _bf16_speed(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        fast = major >= 8
        return fast, f"compute capability {major}.{minor}" + ("" if fast else ": bf16 needs 8.0+")
    if device.type == "cpu":
        features = cpu_bf16_features()
        if features:
            return True, f"this CPU has {' and '.join(features)}"
        return False, "this CPU has no AMX-BF16 or AVX512-BF16: bf16 is emulated and slow"
    return False, f"no bf16 rule for device type {device.type!r}"


def _tf32_flags() -> dict[str, str]:
    return {
        "torch.backends.cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "torch.backends.cudnn.conv.fp32_precision": torch.backends.cudnn.conv.fp32_precision,
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
    }


def _dtypes(tensors: Iterator[torch.Tensor]) -> dict[str, int]:
    return dict(Counter(str(t.dtype)[6:] for t in tensors))


def audit(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    precision: str | Precision = "auto",
    lr: float = 1e-3,
    ignore_index: int = -100,
) -> Audit:
    """One real AdamW step on a copy of `model` under `precision`, and what it used.

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
    work = _copy(model).train()
    optimizer = make_optimizer(work, FitOptions(lr=lr))
    matmuls: Counter = Counter()
    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    handles = [m.register_forward_hook(lambda mod, args, out: matmuls.update(_dtypes(_floats(out))))
               for m in work.modules() if isinstance(m, kinds)]  # fmt: skip
    step_error, x, y = None, *batch
    try:
        with prec.activate():
            with prec.autocast():
                loss = next_token_loss(extract_logits(work(x)), y, ignore_index)
            prec.backward(loss / max(count_targets(y, ignore_index), 1))
            grads = _dtypes(p.grad for p in work.parameters() if p.grad is not None)
            prec.unscale_(optimizer)  # the GradScaler refuses fp16 gradients here
            prec.step(optimizer)
            prec.update()
    except (ValueError, RuntimeError) as exc:
        step_error = f"{type(exc).__name__}: {exc}"
        grads = _dtypes(p.grad for p in work.parameters() if p.grad is not None)
    finally:
        for handle in handles:
            handle.remove()
    state = (v for s in optimizer.state.values() for k, v in s.items() if k != "step")
    fast, why = _bf16_speed(device)
    return Audit(
        prec.name, given.reason, str(device), _dtypes(work.parameters()), grads,
        _dtypes(v for v in state if isinstance(v, torch.Tensor)), dict(matmuls),
        prec.scaler.is_enabled(), prec.loss_scale, step_error, _tf32_flags(), fast, why,
    )  # fmt: skip


class Float32(nn.Module):
    """Runs the wrapped module in fp32 under a disabled autocast region (the `--fix` wrapper)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.float()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Cast floating inputs to fp32, then call the module with autocast off."""
        args, kwargs = _map((args, kwargs), lambda t: t.float())
        tensors = _floats((args, kwargs)) or list(self.inner.parameters())
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


def _flagged(layers: Sequence[LayerHeadroom], first_forward: str | None, margin: float) -> list:
    """Forward-flagged modules, innermost only (wrapping a child keeps its parent's ops fp32)."""
    names = {r.name for r in layers if r.act_headroom_bits < margin}
    names |= {first_forward} if first_forward else set()
    inner = [n for n in names if not any(o.startswith(f"{n}.") for o in names)]
    if len(inner) > 1 and ROOT in inner:
        inner.remove(ROOT)  # the whole model in fp32 is not a fix but a retreat
    return sorted(inner)


def _fix(
    model: nn.Module, names: list[str], sample: list, setup: _Setup, m: _Measured
) -> tuple[FixResult, nn.Module | None]:
    """Wrap `names` in a copy of `model`, rerun the fp16 passes, compare with before."""
    before = m.free["fp16"]
    backward_before = before.first_backward if m.finite_losses["fp16"] else None
    if not names:
        same = (before.first_forward, before.first_forward, backward_before, backward_before)
        return FixResult((), m.losses["fp32"], m.losses["fp16"], m.losses["fp16"], *same), None
    fixed = wrap_fp32(_copy(model), names)
    check, rec = _copy(fixed).float(), _Recorder("free")
    autocast = resolve("fp16", sample[0][0].device).autocast
    losses = [_pass(check, b, rec, autocast(), setup.loss_scale, setup) for b in sample]
    backward_after = rec.first_backward if all(map(math.isfinite, losses)) else None
    result = FixResult(
        tuple(names),
        m.losses["fp32"],
        m.losses["fp16"],
        losses[0],
        before.first_forward,
        rec.first_forward,
        backward_before,
        backward_after,
    )
    return result, fixed


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # the user's model: say why the doctor cannot work on a copy
        raise ModelError(f"the doctor works on a copy of the model, and deepcopy failed: "
                         f"{type(exc).__name__}: {exc}") from exc  # fmt: skip


def _arms(precisions: Sequence[str] | None, device: torch.device) -> list[str]:
    """The AMP precisions to compare with fp32: the given ones, else all the device serves."""
    if precisions is None:
        served = []
        for name in AMP:
            with contextlib.suppress(ValueError):
                served.append(resolve(name, device).name)
        return served
    names = list(dict.fromkeys(normalize(p) for p in precisions))
    wrong = [n for n in names if n not in AMP]
    if wrong or not names:
        raise ConfigError(
            f"precisions={list(precisions)!r}: the doctor compares the AMP "
            f"precisions {list(AMP)} with fp32; {wrong or 'none given'} is not one"
        )
    for name in names:
        resolve(name, device)  # PrecisionError, with its reason, if the device cannot serve it
    return names


def _check(batches: int, batch_size: int, loss_scale: float, margin_bits: float) -> None:
    for name, value in (("batches", batches), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid: it must be an integer >= 1")
    if not (isinstance(loss_scale, (int, float)) and math.isfinite(loss_scale) and loss_scale > 0):
        raise ConfigError(f"loss_scale={loss_scale!r} is invalid: it must be a finite number > 0")
    if not (isinstance(margin_bits, (int, float)) and 0 <= margin_bits < 16):
        raise ConfigError(f"margin_bits={margin_bits!r} is invalid: it must be in [0, 16)")


def doctor(
    model: nn.Module,
    data: object,
    precisions: Sequence[str] | None = None,
    *,
    precision: str | Precision = "auto",
    batches: int = 2,
    batch_size: int = 8,
    seed: int = 0,
    loss_scale: float = 65536.0,
    margin_bits: float = 2.0,
    fix: bool = False,
    lr: float = 1e-3,
    ignore_index: int = -100,
    source: str = "model",
) -> DoctorReport:
    """Diagnose `model` for mixed precision on real batches of `data`; the model is not changed.

    Args:
        model: Any module mapping token ids `[B, T]` to logits `[B, T, V]` (see `adapter`).
        data: `Blocks`, a 2-D integer tensor, a list of token lists, or a dict with `input_ids`.
        precisions: AMP precisions to compare with fp32 (`fp16`, `bf16`); None: all the
            device serves. The fp16 headroom checks run whatever this says.
        precision: The precision you train with; the audit takes one real step in it.
        batches: Batches measured for headroom (divergence uses the first).
        batch_size: Blocks per batch (capped at the number of blocks).
        seed: Seed of the batch choice and of dropout, identical in every pass.
        loss_scale: The fp16 loss scale gradients are measured at (GradScaler's init_scale).
        margin_bits: Flag modules with less headroom than this, in powers of two.
        fix: Also run the flagged modules of a copy in fp32 and repeat the fp16 check; the
            copy is returned as `report.fixed_model`.
        lr: Learning rate of the audit's optimizer step.
        ignore_index: Label value the loss ignores.
        source: How to name the model in error messages.

    Returns:
        A `DoctorReport`: per-module headroom, the first inf/NaN per precision, the divergence
        ranking, the audit, findings with advice, and the fix's before/after.

    Raises:
        ConfigError, DataError, ModelError, PrecisionError: For bad input, before any pass.

    Example:
        >>> report = doctor(model, blocks)  # doctest: +SKIP
        >>> report.overflowing("forward"), report.ranking("fp16")[0].module  # doctest: +SKIP
    """
    _check(batches, batch_size, loss_scale, margin_bits)
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ModelError(f"{source} has no parameters: there is nothing to train or diagnose")
    device = first.device
    arms = _arms(precisions, device)
    chosen = resolve(precision, device, init_scale=loss_scale)
    work = _copy(model).float().train()
    blocks, _ = check_data(work, data, None, device, source, ignore_index)
    size = min(batch_size, len(blocks))
    sample = [(x.to(device), y.to(device)) for x, y in
              itertools.islice(data_mod.batches(blocks, size, seed), batches)]  # fmt: skip
    setup = _Setup(seed, ignore_index, float(loss_scale))
    log.info("doctor: %d batch(es) of %d; fp32 against %s; auditing one %s step",
             len(sample), size, ", ".join(arms), chosen.name)  # fmt: skip
    m = _measure(work, sample, arms, setup)
    layers, firsts = _layers(m), _firsts(m, setup.loss_scale)
    divergence = _divergence(m, arms)
    set_up = audit(model, sample[0], chosen, lr, ignore_index)
    findings = diagnose(layers, firsts, divergence, set_up, margin_bits, setup.loss_scale)
    fixed = result = None
    if fix:
        names = _flagged(layers, m.free["fp16"].first_forward, margin_bits)
        result, fixed = _fix(model, names, sample, setup, m)
        log.info("doctor --fix wrapped %s in a copy of the model", names or "nothing")
    settings = {
        "precision": chosen.name, "precisions": arms, "batches": len(sample),
        "batch_size": size, "context": blocks.context, "seed": seed, "loss_scale": loss_scale,
        "margin_bits": margin_bits, "fix": fix, "source": source,
        "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    from amptrain.train import environment as train_environment

    environment = {"device": str(device), **train_environment()}
    summary = verdict(layers, findings, setup.loss_scale)
    return DoctorReport(layers, firsts, divergence, set_up, findings, result, summary, settings,
                        environment, fixed)  # fmt: skip


SKIP_TRAIN_FLAGS = (
    "--max-steps", "--grad-accum", "--warmup", "--clip-norm", "--eval-every", "--eval-batches",
    "--log-every", "--max-nonfinite", "--checkpoint-every", "--keep-last", "--growth-interval",
)  # fmt: skip
"""Train flags the doctor does not take (it runs a few fixed passes, not a training run)."""


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The doctor's own flags."""
    parser.add_argument("--precisions", help="AMP precisions to compare with fp32, comma-separated "
                        "(default: fp16 and bf16 where the device serves them)")  # fmt: skip
    parser.add_argument("--batches", type=int, default=2, help="batches measured for headroom")
    parser.add_argument(
        "--margin-bits",
        type=float,
        default=2.0,
        help="flag modules with less fp16 headroom than this (powers of two)",
    )
    parser.add_argument(
        "--fix",
        action="store_true",
        help="run flagged modules of a copy in fp32 and check fp16 again",
    )


def cli_main(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """`amptrain doctor`: build model and data like `train`, diagnose, write the run directory."""
    from amptrain.cli import _console
    from amptrain.doctor_report import console_tables, write_report
    from amptrain.runs import atomic_write_json, create_run_dir
    from amptrain.train import pick_device, prepare

    precisions = args.precisions.split(",") if args.precisions else None
    _arms(precisions, pick_device(cfg.device))  # refuse a bad list before loading anything
    model, train, _, precision = prepare(cfg)
    report = doctor(
        model, train, precisions,
        precision=precision, batches=args.batches, batch_size=cfg.fit.batch_size,
        seed=cfg.fit.seed, loss_scale=cfg.fit.init_scale, margin_bits=args.margin_bits,
        fix=args.fix, lr=cfg.fit.lr, ignore_index=cfg.fit.ignore_index, source=cfg.model,
    )  # fmt: skip
    run_dir = create_run_dir(cfg.out, "doctor")
    atomic_write_json(run_dir / "config.json", cfg.to_dict())
    path = write_report(report, run_dir)
    console = _console(stdout=True)
    for table in console_tables(report):
        console.print(table)
    console.print(f"report: {path}", soft_wrap=True, highlight=False)
    return 0
