"""Precision: one vocabulary, resolved once into one small object, with the reason for the choice.

The training loop talks to a `Precision` only: `autocast()` around the forward pass,
`backward(loss)`, `unscale_(optimizer)`, `step(optimizer)`, `update()`. For fp32, tf32 and bf16
the gradient scaler is disabled and every call is a plain pass-through, so the loop has no
`if amp:` branches (Fabric's precision plugin and nanoGPT's `GradScaler(enabled=...)`).

An explicit request is honoured or refused with its reason; it is never silently changed into
another precision. `auto` picks bf16 where the device runs it natively, fp16 on older GPUs, and
fp32 otherwise, and always says why.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from contextlib import nullcontext

import torch

from amptrain.errors import PrecisionError

NAMES = ("fp32", "tf32", "fp16", "bf16")

# One alias table: amptrain's names, Lightning's precision strings and torch dtype names.
ALIASES = {
    "fp32": "fp32", "32": "fp32", "32-true": "fp32", "float32": "fp32",
    "tf32": "tf32",
    "fp16": "fp16", "16-mixed": "fp16", "float16": "fp16",
    "bf16": "bf16", "bf16-mixed": "bf16", "bfloat16": "bf16",
    "auto": "auto",
}  # fmt: skip

# Names people try that amptrain refuses on purpose, with the reason.
_REFUSED = {
    "16": "'16' is ambiguous (Lightning reads it as '16-mixed'); say 'fp16' or '16-mixed'",
    "half": "'half' is ambiguous; say 'fp16' (autocast + GradScaler) or 'bf16'",
    "16-true": "amptrain keeps fp32 master weights; '16-true' would train in pure fp16. "
    "Use 'fp16' (16-mixed)",
    "bf16-true": "amptrain keeps fp32 master weights; 'bf16-true' would train in pure bf16. "
    "Use 'bf16' (bf16-mixed)",
}

_LOW_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def normalize(name: str) -> str:
    """Map any accepted spelling to `fp32`, `tf32`, `fp16`, `bf16` or `auto`.

    Raises:
        PrecisionError: For an unknown name; the message lists the valid ones.
    """
    key = str(name).strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    valid = ", ".join(sorted(ALIASES))
    why = _REFUSED.get(key, "it is not a precision amptrain knows")
    raise PrecisionError(f"precision={name!r} is not accepted: {why}. Valid values: {valid}")


@functools.cache
def cpu_bf16_features() -> tuple[str, ...]:
    """The CPU features that make bf16 autocast fast: AMX-BF16 and AVX512-BF16 (Linux only)."""
    if platform.system() != "Linux":
        return ()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return ()
    return tuple(flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags)


def _cuda_bf16_native(device: torch.device) -> bool:
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _cuda_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


class Precision:
    """A resolved precision: autocast, the gradient scaler, and the reason it was chosen.

    Build one with `resolve()`. The scaler is always present and disabled unless the
    precision is fp16, so checkpoints and telemetry have one shape for every precision.
    """

    def __init__(
        self, name: str, device: torch.device, reason: str, **scaler_options: float
    ) -> None:
        assert name in NAMES, name
        self.name = name
        self.device = device
        self.reason = reason
        self.dtype = _LOW_DTYPE.get(name, torch.float32)
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16", **scaler_options)

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, device={str(self.device)!r}, reason={self.reason!r})"

    @property
    def uses_autocast(self) -> bool:
        """True for fp16 and bf16, whose forward passes run under autocast."""
        return self.name in _LOW_DTYPE

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Set the fp32 matmul mode for the run (TF32 on for tf32, off for fp32), then restore it.

        On CUDA, "fp32" really means IEEE fp32: cuDNN's TF32 default is switched off too.
        """
        if self.device.type != "cuda":
            yield
            return
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        saved = (matmul.fp32_precision, cudnn.conv.fp32_precision)
        mode = "tf32" if self.name == "tf32" else "ieee"
        matmul.fp32_precision = cudnn.conv.fp32_precision = mode
        try:
            yield
        finally:
            matmul.fp32_precision, cudnn.conv.fp32_precision = saved

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context for forward passes: autocast for fp16/bf16, nothing for fp32/tf32."""
        if not self.uses_autocast:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward on the loss, scaled by the current loss scale when fp16."""
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale in place; must come before clipping."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step the optimizer (through the scaler, which skips the step on inf/NaN grads)."""
        self.scaler.step(optimizer)

    def update(self) -> None:
        """Grow or back off the loss scale after an optimizer boundary (no-op unless fp16)."""
        self.scaler.update()

    @property
    def loss_scale(self) -> float:
        """The current loss scale; 1.0 when no scaler is in use."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict:
        """The scaler's state, with an explicit `enabled` flag so every checkpoint has one shape."""
        return {"name": self.name, "enabled": self.scaler.is_enabled(), **self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the scaler state saved by `state_dict()`."""
        state = {k: v for k, v in state.items() if k not in ("name", "enabled")}
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)


def resolve(
    requested: str | Precision = "auto",
    device: str | torch.device = "cpu",
    **scaler_options: float,
) -> Precision:
    """Resolve a precision name for a device into a `Precision`, or refuse it with the reason.

    Args:
        requested: `fp32`, `tf32`, `fp16`, `bf16`, `auto`, or a Lightning alias such as
            `bf16-mixed`. A `Precision` is returned unchanged.
        device: The device the model trains on.
        **scaler_options: `GradScaler` settings (`init_scale`, `growth_factor`,
            `backoff_factor`, `growth_interval`), used by fp16.

    Returns:
        The resolved precision; `.reason` says why it was chosen.

    Raises:
        PrecisionError: For an unknown name, or a request the device cannot serve.

    Example:
        >>> resolve("auto", "cpu").name in ("bf16", "fp32")
        True
    """
    if isinstance(requested, Precision):
        return requested
    device = torch.device(device)
    name = normalize(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrecisionError(
            f"precision={requested!r} on device {str(device)!r}, but CUDA is not available "
            "here; train on 'cpu' (bf16 or fp16 autocast work there too)"
        )
    if name == "auto":
        name, reason = _auto(device)
        return Precision(name, device, reason, **scaler_options)
    return Precision(name, device, _explicit_reason(name, device), **scaler_options)


def _auto(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        if _cuda_bf16_native(device):
            return "bf16", f"auto: {_cuda_name(device)} runs bf16 natively (no loss scaling needed)"
        return "fp16", f"auto: {_cuda_name(device)} has no native bf16; fp16 with loss scaling"
    if device.type == "cpu":
        features = cpu_bf16_features()
        if features:
            return "bf16", f"auto: this CPU has {' and '.join(features)}, so bf16 autocast is fast"
        return "fp32", "auto: this CPU has no AMX-BF16 or AVX512-BF16; bf16 would be emulated"
    return "fp32", f"auto: no mixed-precision rule for device type {device.type!r}; using fp32"


def _explicit_reason(name: str, device: torch.device) -> str:
    kind = device.type
    if kind not in ("cpu", "cuda"):
        if name != "fp32":
            raise PrecisionError(
                f"precision={name!r} is not supported on device {str(device)!r}; use fp32 there, "
                "or train on 'cuda' or 'cpu'"
            )
        return "requested"
    if name == "tf32":
        if kind != "cuda" or not _cuda_bf16_native(device):
            where = "this CPU" if kind == "cpu" else _cuda_name(device)
            raise PrecisionError(
                f"precision='tf32' needs an NVIDIA GPU of compute capability 8.0 or newer, "
                f"and {where} has no TF32 matmuls; use 'fp32' or 'bf16'"
            )
        return "requested: fp32 weights, TF32 tensor-core matmuls"
    if name == "bf16" and kind == "cuda" and not _cuda_bf16_native(device):
        raise PrecisionError(
            f"precision='bf16' needs compute capability 8.0 or newer, and {_cuda_name(device)} "
            "would only emulate it; use 'fp16' (autocast + GradScaler) or 'fp32'"
        )
    if name == "bf16" and kind == "cpu" and not cpu_bf16_features():
        return "requested: this CPU has no AMX-BF16 or AVX512-BF16, so bf16 is emulated and slow"
    if name == "fp16" and kind == "cpu":
        return "requested: fp16 autocast with GradScaler('cpu')"
    if name == "fp16":
        return "requested: fp16 autocast with dynamic loss scaling"
    return "requested"


def default_precisions(device: torch.device) -> list[str]:
    """Every precision the device serves: fp32, tf32 (CUDA), fp16, bf16."""
    names = []
    for name in NAMES:
        try:
            resolve(name, device)
        except PrecisionError:
            continue
        names.append(name)
    return names
