"""The doctor's records, what they mean, and how they are shown.

Findings with advice, a verdict, the console tables, doctor.json, report.md and (with the plot
extra) headroom.png.

`amptrain.doctor` measures; this module turns the measurements into findings (each with the
advice that fits it) and a one-line verdict, and writes them out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import nn

from amptrain._imports import MATPLOTLIB_AVAILABLE
from amptrain.runs import atomic_write_bytes, atomic_write_json

FP16_MAX = 65504.0
"""The largest finite fp16 value."""
FP16_TINY = 2.0**-14
"""The smallest normal fp16 value (about 6.1e-5); below it precision is lost."""
FP16_SUBNORMAL = 2.0**-24
"""The smallest fp16 subnormal (about 6e-8); smaller magnitudes become 0."""
FLUSH_WARN = 0.05
"""Warn when more than this fraction of a tensor's nonzero values would become 0 in fp16."""
DIVERGENCE_WARN = 0.05
"""Warn when a module's local relative error under AMP exceeds this."""
_SEVERITY = {"error": 0, "warning": 1, "info": 2}


@dataclasses.dataclass(frozen=True)
class LayerHeadroom:
    """One module's magnitudes against the fp16 range, measured in fp32, and its fp16 behaviour.

    Headroom is `log2(65504 / absmax)`: the powers of two left before fp16 overflows (negative:
    it overflows). Gradients are those of the loss multiplied by the loss scale, as an fp16
    backward pass holds them; they cover the module's input gradients and its own parameters'.
    """

    name: str
    kind: str
    forward_order: int
    backward_order: int | None
    act_absmax: float
    act_headroom_bits: float
    act_below_normal: float
    act_flushed: float
    grad_absmax: float | None
    grad_headroom_bits: float | None
    grad_below_normal: float | None
    grad_flushed: float | None
    fp16_dtype: str
    fp16_finite: bool
    fp16_grad_finite: bool | None


@dataclasses.dataclass(frozen=True)
class Divergence:
    """How far one module's AMP output is from fp32, on the same batch."""

    precision: str
    module: str
    error: float
    """Local: ||amp - fp32|| / ||fp32|| of its output when its inputs are the fp32 ones."""
    input_error: float
    """How far its input was off before it was replaced (error made by code in the parent)."""
    drift: float
    """Free-running relative error of its output, with upstream errors accumulated."""
    grad_error: float | None
    """Relative error of its own parameters' gradients; None without parameters."""


@dataclasses.dataclass(frozen=True)
class FirstNonfinite:
    """Where inf/NaN first appears under one AMP precision, in execution order."""

    precision: str
    forward: str | None
    backward: str | None
    loss: float
    loss_scale: float


@dataclasses.dataclass(frozen=True)
class Audit:
    """The set-up as one real optimizer step under the chosen precision saw it."""

    precision: str
    reason: str
    device: str
    param_dtypes: dict[str, int]
    grad_dtypes: dict[str, int]
    optimizer_state_dtypes: dict[str, int]
    matmul_dtypes: dict[str, int]
    scaler_enabled: bool
    loss_scale: float
    step_error: str | None
    tf32: dict[str, str]
    bf16_fast: bool
    bf16_why: str


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem or fact, where it is, and what to do about it."""

    severity: str
    kind: str
    module: str | None
    message: str
    advice: str


@dataclasses.dataclass(frozen=True)
class FixResult:
    """The fp16 check before and after running the flagged modules in fp32."""

    wrapped: tuple[str, ...]
    loss_fp32: float
    loss_fp16_before: float
    loss_fp16_after: float
    forward_before: str | None
    forward_after: str | None
    backward_before: str | None
    backward_after: str | None


@dataclasses.dataclass(frozen=True)
class DoctorReport:
    """Everything `amptrain.doctor` found. `fixed_model` is the wrapped copy when `fix=True`."""

    layers: tuple[LayerHeadroom, ...]
    first_nonfinite: tuple[FirstNonfinite, ...]
    divergence: tuple[Divergence, ...]
    audit: Audit
    findings: tuple[Finding, ...]
    fix: FixResult | None
    verdict: str
    settings: dict[str, Any]
    environment: dict[str, Any]
    fixed_model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)

    def layer(self, name: str) -> LayerHeadroom:
        """The headroom row of one module."""
        return next(row for row in self.layers if row.name == name)

    def overflowing(self, direction: str = "forward") -> list[str]:
        """Modules past the fp16 limit, in execution order (`forward` or `backward`)."""
        rows = [
            r for r in self.layers if _bits(r, direction) is not None and _bits(r, direction) < 0
        ]
        return [r.name for r in sorted(rows, key=lambda r: _order(r, direction))]

    def nonfinite(self, precision: str = "fp16") -> FirstNonfinite | None:
        """Where inf/NaN first appeared under `precision`."""
        return next((f for f in self.first_nonfinite if f.precision == precision), None)

    def ranking(self, precision: str) -> list[Divergence]:
        """The modules by local error under `precision`, largest first."""
        return [d for d in self.divergence if d.precision == precision]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the fixed model is described by `fix.wrapped`, not stored)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name != "fixed_model":
                out[field.name] = _plain(getattr(self, field.name))
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _bits(row: LayerHeadroom, direction: str) -> float | None:
    return row.act_headroom_bits if direction == "forward" else row.grad_headroom_bits


def _order(row: LayerHeadroom, direction: str) -> int:
    order = row.forward_order if direction == "forward" else row.backward_order
    return order if order is not None else 1 << 30


def headroom_bits(absmax: float) -> float:
    """Powers of two between `absmax` and fp16's largest finite value (-inf if non-finite)."""
    if not math.isfinite(absmax):
        return -math.inf
    return math.inf if absmax == 0 else math.log2(FP16_MAX / absmax)


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
    rows.sort(key=lambda r: _order(r, "backward"))
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


def pct(value: float | None) -> str:
    """A relative error as a percentage; `inf/NaN` when it is not finite."""
    if value is None:
        return "-"
    return f"{value:.2%}" if math.isfinite(value) else "inf/NaN"


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
    matmul_tf32 = a.tf32.get("torch.backends.cuda.matmul.fp32_precision") == "tf32"
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
    return tuple(sorted(found, key=lambda f: _SEVERITY[f.severity]))


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


def _f(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _shown(report: DoctorReport, limit: int) -> list[LayerHeadroom]:
    """Flagged modules plus the lowest-headroom ones, up to `limit`, in model order."""
    margin = report.settings["margin_bits"]

    def low(r: LayerHeadroom) -> float:
        grad = r.grad_headroom_bits
        return min(r.act_headroom_bits, math.inf if grad is None else grad)

    keep = {r.name for r in report.layers if low(r) < margin or not r.fp16_finite}
    keep |= {r.name for r in sorted(report.layers, key=low)[: max(limit - len(keep), 0)]}
    return [r for r in report.layers if r.name in keep]


def _headers(report: DoctorReport) -> list[str]:
    errors = [f"{p} err" for p in report.settings["precisions"]]
    return ["module", "act max", "fwd bits", "grad max", "bwd bits", "fp16", *errors]


def _row(r: LayerHeadroom, report: DoctorReport) -> list[str]:
    errors = {(d.precision, d.module): d.error for d in report.divergence}
    fp16 = _SHORT.get(r.fp16_dtype, r.fp16_dtype) if r.fp16_finite else "inf/NaN"
    if r.fp16_grad_finite is False:
        fp16 += ", grad inf/NaN"
    return [f"{r.name} ({r.kind})", _f(r.act_absmax), _f(r.act_headroom_bits, ".1f"),
            _f(r.grad_absmax), _f(r.grad_headroom_bits, ".1f"), fp16,
            *[pct(errors.get((p, r.name))) for p in report.settings["precisions"]]]  # fmt: skip


def console_tables(report: DoctorReport, rows: int = 12) -> list[Table]:
    """The headroom table (flagged and lowest-headroom modules), findings, and the fix."""
    s = report.settings
    title = (f"amptrain doctor: fp16 headroom in bits, {s['batches']} batch(es) of "
             f"{s['batch_size']}, gradients at loss scale {s['loss_scale']:g}")  # fmt: skip
    table = Table(title=title, caption=f"verdict: {report.verdict}")
    for header in _headers(report):
        table.add_column(header, overflow="fold")
    for r in _shown(report, rows):
        table.add_row(*_row(r, report))
    findings = Table(title=f"findings (audit of {report.audit.precision}: {report.audit.reason})")
    for header in ("severity", "where", "finding", "advice"):
        findings.add_column(header, overflow="fold")
    for f in report.findings:
        findings.add_row(f.severity, f.module or "set-up", f.message, f.advice)
    if report.fix is None:
        return [table, findings]
    fix = Table(title="--fix (a copy of the model; the original is unchanged)")
    fix.add_column("")
    fix.add_column("before -> after", overflow="fold")
    for key, value in _fix_rows(report.fix).items():
        fix.add_row(key, value)
    return [table, findings, fix]


def _fix_rows(x: FixResult) -> dict[str, str]:
    """The fix's before -> after, by name."""

    def where(name: str | None, loss: float) -> str:
        return name or ("n/a (loss inf/NaN)" if not math.isfinite(loss) else "none")

    before, after = x.loss_fp16_before, x.loss_fp16_after
    return {
        "run in fp32 (wrap_fp32)": ", ".join(x.wrapped) or "nothing flagged",
        "fp16 loss": f"{before:.4g} -> {after:.4g} (fp32 {x.loss_fp32:.4g})",
        "first inf/NaN output": f"{where(x.forward_before, 0)} -> {where(x.forward_after, 0)}",
        "first inf/NaN gradient": f"{where(x.backward_before, before)} -> "
        f"{where(x.backward_after, after)}",
    }


def _fix_lines(x: FixResult) -> list[str]:
    lines = ["", "## --fix: flagged modules run in fp32, in a copy of the model", ""]
    return lines + [f"- {k}: {v}" for k, v in _fix_rows(x).items()]


def markdown(report: DoctorReport) -> str:
    """report.md: verdict, findings, headroom per module, divergence, audit, fix, conditions."""
    s, a = report.settings, report.audit
    lines = ["# amptrain doctor", "", f"**Verdict:** {report.verdict}", "", "## Findings", ""]
    lines += [f"- **{f.severity}** `{f.module or 'set-up'}`: {f.message}. *Advice:* {f.advice}."
              for f in report.findings] or ["- none"]  # fmt: skip
    headers = _headers(report)
    lines += ["", f"## fp16 headroom per module (gradients at loss scale {s['loss_scale']:g})",
              "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]  # fmt: skip
    lines += ["| " + " | ".join(_row(r, report)) + " |" for r in report.layers]
    lines += ["", "## Divergence from fp32", "", "Local error: each module fed fp32's inputs. "
              "Drift: free-running, upstream errors included.", ""]  # fmt: skip
    for precision in s["precisions"]:
        ranked = ", ".join(f"`{d.module}` {pct(d.error)} (drift {pct(d.drift)})"
                           for d in report.ranking(precision)[:8])  # fmt: skip
        lines.append(f"- **{precision}**: {ranked}")
    lines += ["", "## Set-up audit (one real step)", "", f"- {a.precision}: {a.reason}"]
    lines += [f"- {f.name}: {getattr(a, f.name)}" for f in dataclasses.fields(a)[3:]]
    lines += _fix_lines(report.fix) if report.fix is not None else []
    lines += ["", "## Conditions", "", f"- settings: {s}", f"- environment: {report.environment}"]
    return "\n".join(lines) + "\n"


def write_report(report: DoctorReport, run_dir: str | Path) -> Path:
    """Write doctor.json, report.md and (with the plot extra) headroom.png to `run_dir`.

    Args:
        report: The doctor's report.
        run_dir: An existing run directory.

    Returns:
        The path of report.md.
    """
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "doctor.json", report.to_dict())
    if MATPLOTLIB_AVAILABLE:
        from amptrain.doctor_plot import plot_headroom

        plot_headroom(report, run_dir / "headroom.png")
    atomic_write_bytes(run_dir / "report.md", markdown(report).encode())
    return run_dir / "report.md"
