"""The doctor's module hooks: per module, magnitudes, inf/NaN and errors against an fp32 pass.

Hooks record, per module, the absolute maximum and under-/overflow counts of outputs and of
loss-scaled gradients; a `Reference` keeps the fp32 pass's inputs and outputs of every module
call, so that a `forced` recorder can feed every module its fp32 inputs and each AMP error is
that module's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from amptrain.doctor.tensors import (
    ROOT,
    absmax,
    float_tensors,
    magnitudes,
    map_floats,
    relative_error,
)


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


@dataclasses.dataclass
class ModuleFigures:
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


class Reference:
    """The fp32 pass's inputs and outputs of every module call, and its parameter gradients."""

    def __init__(self) -> None:
        self.inputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self._clones: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._norms: dict[int, float] = {}

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """A detached copy of `t` as it is now, made once per tensor state."""
        # One copy per tensor state: the residual stream feeds many modules, and an in-place
        # op (which bumps `_version`) makes the same tensor object a new value.
        key = (id(t), t._version)
        if key not in self._clones:
            clone = t.detach().clone()
            self._norms[id(clone)] = float(torch.linalg.vector_norm(clone))  # inf/NaN: see error
            self._clones[key] = (t, clone)
        return self._clones[key][1]

    def done(self) -> None:
        """Drop the bookkeeping of the pass (the kept copies stay)."""
        self._clones.clear()

    def error(self, value: torch.Tensor, ref: torch.Tensor) -> float:
        """||value - ref|| / ||ref||, where `ref` was kept here."""
        norm = self._norms[id(ref)]
        if not math.isfinite(norm):  # an attention mask with -inf, say
            return relative_error(value, ref)
        diff = float(torch.dist(value.detach().to(ref.dtype), ref))
        error = diff / norm if norm > 0 else diff
        return error if math.isfinite(error) else math.inf


class Recorder:
    """Hooks on every module, in one of three modes.

    `measure`: fp32 magnitudes of outputs and gradients, storing `ref` on the first batch;
    `free`: an AMP pass, its outputs compared with `ref`; `forced`: an AMP pass whose module
    inputs and outputs are replaced by the fp32 ones, so each module's error is its own.
    """

    def __init__(self, mode: str, ref: Reference | None = None) -> None:
        self.mode, self.ref = mode, ref
        self.acc: dict[str, ModuleFigures] = {}
        self.first_forward: str | None = None
        self.first_backward: str | None = None
        self._calls: Counter = Counter()
        self._outputs = itertools.count()
        self._grads = itertools.count()

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        """Hooks on every module (and parameter) of `model` while the block runs."""
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
        acc = self.acc.setdefault(name, ModuleFigures(type(module).__name__))
        call = (name, self._calls[name])
        self._calls[name] += 1
        if self.mode == "forced":
            refs = iter(self.ref.inputs.get(call, []))
            inputs = float_tensors((args, kwargs))
            if len(inputs) != len(self.ref.inputs.get(call, [])):
                return None
            for t, r in zip(inputs, self.ref.inputs[call]):
                acc.input_error = max(acc.input_error, self.ref.error(t, r))
            return map_floats((args, kwargs), lambda t: next(refs).to(t.dtype, copy=True))
        if self.mode == "measure" and self.ref is not None:
            self.ref.inputs[call] = [self.ref.keep(t) for t in float_tensors((args, kwargs))]
        if not torch.is_grad_enabled():
            return None
        tap = functools.partial(self._grad, (name,))
        return map_floats((args, kwargs), lambda t: _Tap.apply(t, tap) if t.requires_grad else t)

    def _post(self, name: str, module: nn.Module, args: tuple, output: Any) -> Any:
        acc, outs = self.acc[name], float_tensors(output)
        if not outs:
            return None
        call = (name, self._calls[name] - 1)
        if acc.forward_order is None:
            acc.forward_order, acc.dtype = next(self._outputs), str(outs[0].dtype)[6:]
        if self.mode == "measure":
            for t in outs:
                _merge(acc.act, magnitudes(t))
            self._forward_seen(acc, name, math.isfinite(acc.act[0]))
            if self.ref is not None:
                self.ref.outputs[call] = [self.ref.keep(t) for t in outs]
            return None
        refs = self.ref.outputs.get(call) if self.ref is not None else None
        if refs is None or len(refs) != len(outs):
            self._forward_seen(acc, name, all(math.isfinite(absmax(t)) for t in outs))
            return None
        error = max(self.ref.error(t, r) for t, r in zip(outs, refs))
        # A finite error implies finite outputs: the costly check runs only when it is not.
        finite = math.isfinite(error) or all(math.isfinite(absmax(t)) for t in outs)
        self._forward_seen(acc, name, finite)
        if self.mode == "free":
            acc.drift = max(acc.drift, error)
            return None
        acc.error = max(acc.error, error)
        it = iter(refs)
        return map_floats(output, lambda t: next(it).to(t.dtype, copy=True))

    def _forward_seen(self, acc: ModuleFigures, name: str, finite: bool) -> None:
        acc.finite &= finite
        if not finite and self.first_forward is None:
            self.first_forward = name

    def _grad(self, names: tuple[str, ...], grad: torch.Tensor) -> None:
        scan = magnitudes(grad) if self.mode == "measure" else None
        finite = math.isfinite(scan[0] if scan else absmax(grad))
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
