"""Which scaled-dot-product-attention backend the training step uses, decided by measurement.

On some CPUs torch's bf16 flash-attention backward is several times slower than the same
kernel in fp32, and slower than the plain "math" attention built from matmuls. Which one is
faster depends on the CPU, the dtype and the model's shapes, so it is measured: at the start
of a run, the model's own forward and backward on one batch are timed with each backend,
interleaved, and the faster one is kept when it wins by a clear margin. The choice applies
only inside amptrain's own step and evaluation (`sdpa_kernel` is a context manager), never as
a global switch, and only to models that call `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from amptrain import distributed
from amptrain.adapter import extract_logits
from amptrain.precision import Precision

CHOICES = ("auto", "default", "math")
"""`auto` measures; `default` leaves torch's own choice; `math` forces the matmul path."""

MARGIN = 0.9
"""The math path must take at most this fraction of the default's time to be chosen."""


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """The backend the step runs attention with, and why."""

    backend: str
    """`default` (torch's own choice) or `math`."""
    reason: str

    def context(self) -> contextlib.AbstractContextManager:
        """The scope of one forward: `sdpa_kernel(MATH)` for math, nothing for default."""
        if self.backend == "math":
            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()


class _SdpaCounter(TorchFunctionMode):
    """Counts calls to `F.scaled_dot_product_attention` during a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, D105
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def plan(
    requested: str, model: nn.Module, precision: Precision, sample: torch.Tensor, repeats: int = 3
) -> AttentionPlan:
    """Decide the attention backend for training `model` on batches like `sample`.

    Args:
        requested: One of `CHOICES`.
        model: The model (not DDP-wrapped); its gradients are left as they were found (None).
        precision: The run's precision; the timing runs under its autocast.
        sample: One input batch `[B, T]` on the model's device.
        repeats: Timed forward+backward passes per backend.
    """
    if requested != "auto":
        return AttentionPlan(requested, "requested")
    if not precision.uses_autocast:
        return AttentionPlan(
            "default", f"{precision.name}: torch's default (measured only under autocast)"
        )
    key = (type(model).__qualname__, sum(p.numel() for p in model.parameters()),
           tuple(sample.shape), precision.name, str(sample.device))  # fmt: skip
    if key not in _MEASURED:  # once per process and model shape: runs of a bench share it
        _MEASURED[key] = _measure(model, precision, sample, repeats)
    return _MEASURED[key]


_MEASURED: dict[tuple, AttentionPlan] = {}


def reset() -> None:
    """Forget the plans measured in this process, so the next `auto` measures again."""
    _MEASURED.clear()


def _measure(
    model: nn.Module, precision: Precision, sample: torch.Tensor, repeats: int
) -> AttentionPlan:
    """Count the model's SDPA calls, then time both backends (agreed across ranks)."""
    was_training = model.training
    model.eval()  # the same kernels, without dropout or the training-only hooks of callers
    try:
        counter = _SdpaCounter()
        with torch.no_grad(), counter, precision.autocast():
            model(sample)
        if counter.calls == 0:
            return AttentionPlan(
                "default", "the model does not call F.scaled_dot_product_attention"
            )
        times = _time_backends(model, precision, sample, repeats)
    finally:
        model.train(was_training)
    default, math_ = distributed.all_reduce(
        [times["default"], times["math"]]
    )  # one choice for all ranks
    ratio = math_ / default
    backend = "math" if ratio <= MARGIN else "default"
    return AttentionPlan(backend, f"measured: math attention takes {ratio:.2f}x the default's time")


def _time_backends(
    model: nn.Module, precision: Precision, sample: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Median seconds of one forward+backward per backend, interleaved after one warm-up each."""
    runs: dict[str, list[float]] = {"default": [], "math": []}
    try:
        for i in range(repeats + 1):
            for name in runs:
                seconds = time_pass(model, precision, sample, name)
                model.zero_grad(set_to_none=True)  # the next pass's forward without them
                if i:  # the first pass of each backend is warm-up
                    runs[name].append(seconds)
    finally:
        model.zero_grad(set_to_none=True)
    return {name: statistics.median(values) for name, values in runs.items()}


def time_pass(model: nn.Module, precision: Precision, sample: torch.Tensor, backend: str) -> float:
    """Seconds of one forward+backward of `model` on `sample` with attention `backend`.

    `backend` is "default" or "math"; on CUDA the pass is synchronised. What `auto` compares.
    """
    sync = (lambda: torch.cuda.synchronize(sample.device)) if sample.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with AttentionPlan(backend, "").context():  # the backward too: it may recompute a block
        with precision.autocast():
            logits = extract_logits(model(sample))
        logits.float().square().mean().backward()
    sync()
    return time.perf_counter() - start
