"""Precision: one vocabulary, resolved once into one small object, with the reason for the choice.

The training loop talks to a `Precision` only: `autocast()` around the forward pass,
`backward(loss)`, `unscale_(optimizer)`, `step(optimizer)`, `update()`. For fp32, tf32 and bf16
the gradient scaler is disabled and every call is a plain pass-through, so the loop has no
`if amp:` branches (Fabric's precision plugin and nanoGPT's `GradScaler(enabled=...)`).

An explicit request is honoured or refused with its reason; it is never silently changed into
another precision. What a precision costs here is measured (`capability.probe`), not guessed
from CPU flags: `auto` takes the fastest precision whose matmuls clearly beat fp32 and that is
numerically safe by default (never fp16 on a CPU), and quotes the figures; a requested precision
the device only emulates carries a `warning` that `fit` logs before the first step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import nullcontext

import torch

from amptrain import capability, decisions, distributed, tf32
from amptrain.capability import Capabilities
from amptrain.errors import PrecisionError

log = logging.getLogger("amptrain")

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
    "bf16-true": "'bf16-true' is bf16 autocast with bf16 weights, a setting of a training run "
    "(train, fit: --precision bf16-true, or --weights bf16), not a precision of its own",
}

_WARNED: set[tuple[str, str]] = set()  # (device, precision) pairs warned in this process

_LOW_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def reset_warnings() -> None:
    """Forget which emulated-precision warnings were said, so the next run says them again.

    `Precision.warn_if_emulated` warns once per process and device (a benchmark's repeats
    say it once); a long-lived process whose machine changed, or a test, starts over here.
    """
    _WARNED.clear()


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


def cpu_bf16_features() -> tuple[str, ...]:
    """The CPU's bf16 flags (AMX-BF16, AVX512-BF16; Linux only): a hint, not the decision."""
    return tuple(f for f in capability.cpu_flags() if f in ("amx_bf16", "avx512_bf16"))


class Precision:
    """A resolved precision: autocast, the gradient scaler, and the reason it was chosen.

    Build one with `resolve()`. The scaler is always present and disabled unless the
    precision is fp16, so checkpoints and telemetry have one shape for every precision.
    """

    def __init__(
        self,
        name: str,
        device: torch.device,
        reason: str,
        probe: Capabilities | None = None,
        **scaler_options: float,
    ) -> None:
        assert name in NAMES, name
        self.name = name
        self.device = device
        self.reason = reason
        self.probe = probe
        # Set when the device only emulates this precision (and, for auto, when its probe was
        # unreliable or decided otherwise before): said once, before training.
        self.warning = probe.slow_warning(name) if probe is not None else None
        self.dtype = _LOW_DTYPE.get(name, torch.float32)
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16", **scaler_options)

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, device={str(self.device)!r}, reason={self.reason!r})"

    def warn_if_emulated(self) -> None:
        """Log `warning` once per process and device, so a benchmark's repeats say it once."""
        key = (str(self.device), self.name)
        if self.warning and key not in _WARNED:
            _WARNED.add(key)
            log.warning("%s", self.warning)

    def probe_figures(self) -> dict | None:
        """The measured matmul table this precision was decided on, for `summary.json`."""
        return None if self.probe is None else self.probe.to_dict()

    @property
    def uses_autocast(self) -> bool:
        """True for fp16 and bf16, whose forward passes run under autocast."""
        return self.name in _LOW_DTYPE

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Set the fp32 matmul mode for the run (TF32 on for tf32, off for fp32), then restore it.

        On CUDA, "fp32" really means IEEE fp32: cuDNN's TF32 default is switched off too. The
        switch goes through torch's legacy API (`amptrain.tf32`), so every TF32 getter, torch's,
        inductor's, Lightning's and the doctor's, reads it inside and after the block.
        """
        if self.device.type != "cuda":
            yield
            return
        with tf32.matmul_mode(self.name == "tf32"):
            yield

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
    if device.type == "cuda" and not capability.cuda_available():
        raise PrecisionError(
            f"precision={requested!r} on device {str(device)!r}, but CUDA is not available "
            "here; train on 'cpu' (bf16 or fp16 autocast work there too)"
        )
    caps = capability.probe(device) if device.type in ("cpu", "cuda") else None
    if name == "auto":
        name, reason = auto_choice(caps, device)
        doubt = ""
        if caps is not None:  # a busy machine's probe must not flip the decision in silence
            # Decided (and recorded) once, on rank 0: ranks with other caches or probes would
            # otherwise train in different precisions, or hang in mismatched collectives.
            settled = decisions.settle(caps, auto_candidate(caps), name, reason) if (
                distributed.is_main()) else None  # fmt: skip
            name, reason, doubt = distributed.broadcast(settled)
        prec = Precision(name, device, reason, caps, **scaler_options)
        prec.warning = "; ".join(w for w in (doubt, prec.warning) if w) or None
        return prec
    return Precision(name, device, explicit_reason(name, device, caps), caps, **scaler_options)


def resumed(
    trained: str,
    requested: str | None,
    where: str,
    allow_new_scaler: bool = False,
    asked_by: str = "--precision",
) -> str:
    """The precision a resumed run trains in: the one its checkpoint was trained in.

    `auto` (or None) takes it without deciding again: a new measurement on a busy machine
    could pick another precision, and the run would go on in it without a word. The same
    name is accepted; another is refused, except fp16 with `allow_new_scaler` (a fresh loss
    scale, which `checkpoint_state.restore` announces).

    Args:
        trained: The checkpoint's precision.
        requested: The precision asked for now (a name or alias), or None.
        where: The checkpoint, as the refusal names it.
        allow_new_scaler: Accept a change into fp16 with a fresh GradScaler.
        asked_by: Where `requested` comes from, as the refusal names it.

    Raises:
        PrecisionError: Naming both precisions and the fixes.
    """
    trained = normalize(trained)
    name = "auto" if requested is None else normalize(requested)
    if name == "auto" or name == trained or (name == "fp16" and allow_new_scaler):
        return trained if name == "auto" else name
    fixes = f"leave --precision out (auto keeps it) or give --precision {trained}"
    if name == "fp16":
        fixes += ", or pass --allow-new-scaler to go on in fp16 with a fresh loss scale"
    raise PrecisionError(
        f"precision {name!r} ({asked_by}) differs from {trained!r}, the precision {where} was "
        "trained in; "
        f"a resumed run keeps its precision (its optimizer state and loss scale belong to it): "
        f"{fixes}; or train these weights in {name} as a new run with --init-from"
    )


def auto_choice(caps: Capabilities | None, device: torch.device) -> tuple[str, str]:
    """`auto`'s precision and reason, decided from the measured table `caps`.

    CPU: bf16 when its matmuls clearly beat fp32's, else fp32; never fp16, whose loss scaling
    is not worth its risk where bf16 or fp32 serve. CUDA: bf16 from compute capability 8.0,
    else fp16 with loss scaling, unless the probe finds that choice no faster than fp32.
    """
    if caps is None:
        return "fp32", f"auto: no mixed-precision rule for device type {device.type!r}; using fp32"
    if caps.device_type == "cuda":
        cc = caps.compute_capability or (0, 0)
        name = auto_candidate(caps)
        if caps.emulated(name) or not caps.clearly_faster(name):
            return "fp32", f"auto: fp32, since {name} is not clearly faster: {caps.figures(name)}"
        why = "runs bf16 natively (no loss scaling)" if name == "bf16" else "has no native bf16"
        return name, f"auto: {caps.name} (sm_{cc[0]}{cc[1]}) {why}; {caps.figures(name)}"
    if caps.clearly_faster("bf16"):
        return "bf16", f"auto: bf16, whose matmuls clearly beat fp32's: {caps.figures('bf16')}"
    return "fp32", (
        f"auto: fp32, since bf16 is not clearly faster ({caps.figures('bf16')}); "
        "fp16 is never chosen on a CPU"
    )


def auto_candidate(caps: Capabilities) -> str:
    """The lower precision `auto` weighs against fp32: fp16 on CUDA before 8.0, else bf16."""
    if caps.device_type == "cuda" and (caps.compute_capability or (0, 0)) < (8, 0):
        return "fp16"
    return "bf16"


def explicit_reason(name: str, device: torch.device, caps: Capabilities | None) -> str:
    """The reason text of a requested precision, or the refusal when the device cannot serve it.

    Raises:
        PrecisionError: tf32 off Ampere-class CUDA, bf16 on CUDA before 8.0, or any lower
            precision on a device that is neither CPU nor CUDA.
    """
    kind = device.type
    if kind not in ("cpu", "cuda"):
        if name != "fp32":
            raise PrecisionError(
                f"precision={name!r} is not supported on device {str(device)!r}; use fp32 there, "
                "or train on 'cuda' or 'cpu'"
            )
        return "requested"
    cc = caps.compute_capability if caps is not None else None
    where = "this CPU" if kind == "cpu" else f"{caps.name} (sm_{cc[0]}{cc[1]})"
    if name == "tf32" and (kind != "cuda" or cc < (8, 0)):
        raise PrecisionError(
            f"precision='tf32' needs an NVIDIA GPU of compute capability 8.0 or newer, "
            f"and {where} has no TF32 matmuls; use 'fp32' or 'bf16'"
        )
    if name == "bf16" and kind == "cuda" and cc < (8, 0):
        raise PrecisionError(
            f"precision='bf16' needs compute capability 8.0 or newer, and {where} "
            "would only emulate it; use 'fp16' (autocast + GradScaler) or 'fp32'"
        )
    if name == "fp32":
        return "requested"
    what = {
        "tf32": "fp32 weights, TF32 tensor-core matmuls",
        "bf16": "bf16 autocast",
        "fp16": f"fp16 autocast with GradScaler({kind!r})",
    }[name]
    if caps is None:
        return f"requested: {what}"
    return f"requested: {what}; {caps.figures(name)}"


def default_precisions(device: torch.device) -> list[str]:
    """fp32 and every other precision the device serves without emulating it (probe-measured)."""
    return default_plan(probe_of(device), device)[0]


def probe_of(device: torch.device) -> capability.Capabilities | None:
    """The measured capability table of `device` (None where there is no probe for it)."""
    return capability.probe(device) if device.type in ("cpu", "cuda") else None


def default_plan(
    caps: capability.Capabilities | None, device: torch.device
) -> tuple[list[str], dict[str, str]]:
    """The default arms from the probe table, and a skip reason for each one left out.

    Left out: a precision the device only emulates, and one the probe could not classify
    (its rounds disagree even after it measured again): the plan keeps to what it can tell.
    """
    names, skipped = [], {}
    for name in NAMES:
        try:
            explicit_reason(name, device, caps)
        except PrecisionError:
            continue
        if caps is not None and caps.emulated(name):
            skipped[name] = skip_reason(caps, name)
        elif caps is not None and name != "fp32" and (doubt := caps.undecided(name)):
            skipped[name] = (
                f"skipped: the probe could not tell whether {name} is emulated here ({doubt}); "
                f"pass --precisions {name} to time it anyway"
            )
        else:
            names.append(name)
    return names, skipped


def skip_reason(caps: capability.Capabilities, name: str) -> str:
    """Why a default arm set leaves out an emulated precision, and how to time it anyway."""
    where = "this CPU" if caps.device_type == "cpu" else "this GPU"
    return (
        f"skipped: {name} matmuls run {1 / caps.ratio(name):.0f}x slower than fp32 on {where} "
        f"({caps.figures(name)}); pass --precisions {name} to time it anyway"
    )
