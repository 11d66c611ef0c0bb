"""The doctor's findings: what the measurements mean, with advice for each, and a verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence

from amptrain.doctor.records import (
    DIVERGENCE_WARN,
    FLUSH_WARN,
    SEVERITY,
    Audit,
    Divergence,
    Finding,
    FirstNonfinite,
    LayerHeadroom,
    pass_order,
    pct,
)


def _names(rows: Sequence[LayerHeadroom], limit: int = 4) -> str:
    names = [r.name for r in rows[:limit]]
    return ", ".join(names) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _fp32_advice(names: str) -> str:
    return (
        f"run {names} in fp32 under a disabled autocast region (`amptrain doctor --fix` shows the "
        f"effect; `amptrain.doctor.wrap_fp32(model, [...])` does it), or train in bf16, whose "
        "range is fp32's; or keep the values small (normalise or rescale before it)"
    )


def _forward_findings(layers: Sequence[LayerHeadroom], margin: float) -> list[Finding]:
    rows = sorted(
        (r for r in layers if r.act_headroom_bits < margin), key=lambda r: r.forward_order
    )
    over = [r for r in rows if r.act_headroom_bits < 0]
    if over:
        first = over[0]
        fp16 = "produced inf/NaN" if not first.fp16_finite else f"ran in {first.fp16_dtype}"
        size = (f"values up to {first.act_absmax:.3g}, beyond fp16's 65504 "
                f"({first.act_headroom_bits:+.1f} bits of headroom)")  # fmt: skip
        if not math.isfinite(first.act_absmax):
            size = "inf/NaN even in fp32 (a bug, or a mask of -inf returned as an output)"
        message = f"{first.name} ({first.kind}) outputs {size}; under fp16 autocast it {fp16}"
        if len(over) > 1:
            message += f"; {len(over) - 1} more overflow after it: {_names(over[1:])}"
        return [
            Finding("error", "forward-overflow", first.name, message, _fp32_advice(_names(over)))
        ]
    if not rows:
        return []
    low = min(rows, key=lambda r: r.act_headroom_bits)
    message = (
        f"{low.name} peaks at {low.act_absmax:.3g}, {low.act_headroom_bits:.1f} bits below "
        f"fp16's limit (margin {margin:g} bits); a larger batch or more training can push it over"
    )
    return [Finding("warning", "forward-near-overflow", low.name, message, _fp32_advice(low.name))]


def _backward_findings(
    layers: Sequence[LayerHeadroom], margin: float, scale: float
) -> list[Finding]:
    rows = [r for r in layers if r.grad_headroom_bits is not None and r.grad_headroom_bits < margin]
    if not rows:
        return []
    rows.sort(key=lambda r: pass_order(r, "backward"))
    over = [r for r in rows if r.grad_headroom_bits < 0]
    first = over[0] if over else min(rows, key=lambda r: r.grad_headroom_bits)
    scale_bits = math.log2(scale)
    # The largest power-of-two loss scale that leaves `margin` bits for this gradient.
    fits = math.floor(first.grad_headroom_bits + scale_bits - margin)
    at = f"at loss scale {scale:g} (2^{scale_bits:g})"
    if fits >= 0:
        lower = f"start the GradScaler at 2^{fits} (--init-scale {2.0**fits:g}) or lower"
        advice = f"{lower}, or use bf16, which needs no loss scaling"
    else:
        advice = (f"no loss scale >= 1 fits: bound {first.name}'s gradient (check a custom "
                  "backward, clip the activation), run it in fp32, or use bf16")  # fmt: skip
    if not over:
        message = (f"the gradient at {first.name} peaks at {first.grad_absmax:.3g} {at}, "
                   f"{first.grad_headroom_bits:.1f} bits below fp16's 65504")  # fmt: skip
        advice = "the GradScaler backs off by itself (skipping steps); " + advice
        return [Finding("warning", "backward-near-overflow", first.name, message, advice)]
    message = (f"the gradient from {first.name}'s backward reaches {first.grad_absmax:.3g} {at}, "
               "beyond fp16's 65504")  # fmt: skip
    if len(over) > 1:
        message += f"; {len(over) - 1} more overflow after it in the backward pass"
    return [Finding("error", "backward-overflow", first.name, message, advice)]


def _nonfinite_findings(firsts: Sequence[FirstNonfinite], found: list[Finding]) -> list[Finding]:
    named = {(f.kind.split("-")[0], f.module) for f in found if f.kind.endswith("overflow")}
    out = []
    for f in firsts:
        if f.forward and ("forward", f.forward) not in named:
            message = (
                f"under {f.precision} autocast the first inf/NaN output comes from {f.forward}"
            )
            out.append(
                Finding("error", "forward-nonfinite", f.forward, message, _fp32_advice(f.forward))
            )
        if f.backward and ("backward", f.backward) not in named:
            message = (f"under {f.precision} (loss scale {f.loss_scale:g}) the first inf/NaN "
                       f"gradient comes from {f.backward}'s backward")  # fmt: skip
            advice = "lower the initial loss scale (--init-scale), use bf16, or run it in fp32"
            out.append(Finding("error", "backward-nonfinite", f.backward, message, advice))
    return out


def _underflow_findings(layers: Sequence[LayerHeadroom], scale: float) -> list[Finding]:
    out = []
    act = max(layers, key=lambda r: r.act_flushed, default=None)
    if act is not None and act.act_flushed > FLUSH_WARN:
        message = (f"{act.act_flushed:.0%} of the nonzero values {act.name} outputs are below "
                   "fp16's smallest subnormal (6e-8) and would become 0")  # fmt: skip
        advice = f"use bf16 (fp32's exponent range) or run {act.name} in fp32"
        out.append(Finding("warning", "forward-underflow", act.name, message, advice))
    grads = [r for r in layers if r.grad_flushed is not None]
    grad = max(grads, key=lambda r: r.grad_flushed, default=None)
    if grad is not None and grad.grad_flushed > FLUSH_WARN:
        message = (f"{grad.grad_flushed:.0%} of the nonzero gradient values at {grad.name} would "
                   f"become 0 in fp16 even at loss scale {scale:g}")  # fmt: skip
        advice = "raise the loss scale (--init-scale; the GradScaler also grows it), or use bf16"
        out.append(Finding("warning", "backward-underflow", grad.name, message, advice))
    return out


def _divergence_findings(divergence: Sequence[Divergence]) -> list[Finding]:
    out = []
    for precision in dict.fromkeys(d.precision for d in divergence):
        rows = [d for d in divergence if d.precision == precision]
        top, worst_in = rows[0], max(rows, key=lambda d: d.input_error)
        message = (f"{precision}: {top.module} loses the most precision, a relative error of "
                   f"{pct(top.error)} given exact inputs (free-running {pct(top.drift)}, "
                   f"parameter gradients {pct(top.grad_error)})")  # fmt: skip
        if worst_in.input_error > top.error:
            off = pct(worst_in.input_error)
            message += (f"; the input of {worst_in.module} arrives {off} off, from functional "
                        "code in its parent (attention, residual adds)")  # fmt: skip
        severity = "warning" if not top.error <= DIVERGENCE_WARN else "info"
        advice = (f"if {precision} costs accuracy, run {top.module} in fp32 (wrap_fp32) and "
                  "compare the validation loss with `amptrain bench`")  # fmt: skip
        out.append(Finding(severity, "divergence", top.module, message, advice))
    return out


def _audit_findings(a: Audit) -> list[Finding]:
    out = []
    low = sorted(d for d in a.param_dtypes if d in ("float16", "bfloat16"))
    if "float16" in low and a.precision == "fp16":
        message = ("parameters are already float16 under fp16 AMP: the GradScaler refuses "
                   "their gradients" + (f" ({a.step_error})" if a.step_error else ""))  # fmt: skip
        advice = "keep fp32 master weights: call model.float() and let autocast do the casting"
        out.append(Finding("error", "half-model", None, message, advice))
    elif low:
        message = f"parameters are {', '.join(low)}: there are no fp32 master weights"
        advice = "updates smaller than one ulp are lost; call model.float() and use AMP instead"
        out.append(Finding("warning", "half-model", None, message, advice))
    if a.step_error and not out:
        message = f"one {a.precision} step failed: {a.step_error}"
        out.append(Finding("error", "step-failed", None, message, "fix this before tuning"))
    if a.precision in ("fp16", "bf16") and a.matmul_dtypes and set(a.matmul_dtypes) == {"float32"}:
        message = f"{a.precision} autocast ran no nn.Linear/conv in low precision: AMP did nothing"
        advice = "call the model inside autocast, and check for autocast(enabled=False) regions"
        out.append(Finding("error", "autocast-inactive", None, message, advice))
    if a.precision in ("fp16", "bf16") and not a.matmul_dtypes:
        message = "the model has no nn.Linear/conv, so autocast's effect could not be checked"
        out.append(Finding("info", "autocast-unchecked", None, message, "see matmul_dtypes"))
    if a.precision in ("fp32", "tf32"):
        hint = "bf16 is fast here; try --precision bf16" if a.bf16_fast else a.bf16_why
        out.append(Finding("info", "amp-off", None, f"{a.precision}: AMP is off", hint))
    if a.precision == "fp16" and not a.scaler_enabled:
        out.append(Finding("error", "no-scaler", None, "fp16 without an enabled GradScaler",
                           "gradients below 6e-8 vanish; enable loss scaling"))  # fmt: skip
    if a.precision == "fp16" and a.bf16_fast:
        out.append(Finding("info", "bf16-available", None, f"bf16 is fast here ({a.bf16_why})",
                           "bf16 has fp32's range and needs no loss scaling"))  # fmt: skip
    matmul_tf32 = a.tf32.get("torch.backends.cuda.matmul.allow_tf32") == "True"
    if a.device.startswith("cuda") and a.precision == "fp32" and matmul_tf32:
        message = "TF32 is switched on in this process: fp32 matmuls outside amptrain run as TF32"
        advice = "amptrain.fit uses IEEE fp32 for 'fp32' and TF32 only for 'tf32'"
        out.append(Finding("info", "tf32-on", None, message, advice))
    if a.precision == "bf16" and not a.bf16_fast:
        out.append(Finding("warning", "bf16-slow", None, a.bf16_why, "use fp16 or fp32 here"))
    return out


def diagnose(
    layers: Sequence[LayerHeadroom],
    firsts: Sequence[FirstNonfinite],
    divergence: Sequence[Divergence],
    audit: Audit,
    margin_bits: float,
    loss_scale: float,
) -> tuple[Finding, ...]:
    """Turn the measurements into findings, errors first, each with its advice.

    Args:
        layers: Headroom per module.
        firsts: Where inf/NaN first appeared, per AMP precision.
        divergence: Local errors, ranked.
        audit: The set-up audit.
        margin_bits: Headroom below which a module is flagged.
        loss_scale: The loss scale gradients were measured at.

    Returns:
        The findings, sorted by severity.
    """
    found = _forward_findings(layers, margin_bits)
    found += _backward_findings(layers, margin_bits, loss_scale)
    found += _nonfinite_findings(firsts, found)
    found += _underflow_findings(layers, loss_scale)
    found += _divergence_findings(divergence)
    found += _audit_findings(audit)
    return tuple(sorted(found, key=lambda f: SEVERITY[f.severity]))


def verdict(layers: Sequence[LayerHeadroom], findings: Sequence[Finding], scale: float) -> str:
    """One line: the problems, or the smallest headroom left."""
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        return "; ".join(f"{f.kind}" + (f" at {f.module}" if f.module else "") for f in errors)
    warnings = sorted({f.kind for f in findings if f.severity == "warning"})
    also = f"; warnings: {', '.join(warnings)}" if warnings else ""
    fwd = min((r.act_headroom_bits for r in layers), default=math.inf)
    bwd = min((r.grad_headroom_bits for r in layers if r.grad_headroom_bits is not None),
              default=math.inf)  # fmt: skip
    return (f"no overflow: at least {fwd:.1f} bits of fp16 headroom forward, {bwd:.1f} backward "
            f"at loss scale {scale:g}{also}")  # fmt: skip
