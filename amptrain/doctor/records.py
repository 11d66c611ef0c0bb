"""The doctor's records, what they mean, and how they are shown.

Findings with advice, a verdict, the console tables, doctor.json, report.md and (with the plot
extra) headroom.png.

`amptrain.doctor` measures; this module turns the measurements into findings (each with the
advice that fits it) and a one-line verdict, and writes them out.
"""

from __future__ import annotations

import dataclasses
import math
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
SEVERITY = {"error": 0, "warning": 1, "info": 2}
"""Finding severities, most severe first: their sort keys."""


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
    probe: dict[str, Any] | None = None  # capability.Capabilities.to_dict() of the device


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
        return [r.name for r in sorted(rows, key=lambda r: pass_order(r, direction))]

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


def pass_order(row: LayerHeadroom, direction: str) -> int:
    """When the module ran in the `forward` or `backward` pass; last if it never did."""
    order = row.forward_order if direction == "forward" else row.backward_order
    return order if order is not None else 1 << 30


def headroom_bits(absmax: float) -> float:
    """Powers of two between `absmax` and fp16's largest finite value (-inf if non-finite)."""
    if not math.isfinite(absmax):
        return -math.inf
    return math.inf if absmax == 0 else math.log2(FP16_MAX / absmax)


def pct(value: float | None) -> str:
    """A relative error as a percentage; `inf/NaN` when it is not finite."""
    if value is None:
        return "-"
    return f"{value:.2%}" if math.isfinite(value) else "inf/NaN"


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
    errors = [f"{p}\nerr" for p in report.settings["precisions"]]
    return ["module", "act\nmax", "fwd\nbits", "grad\nmax", "bwd\nbits", "fp16", *errors]


def short_name(name: str, width: int = 26) -> str:
    """`name` cut in the middle to `width` characters: its end says which module it is."""
    if len(name) <= width:
        return name
    head = width // 3
    return f"{name[:head]}…{name[len(name) - (width - head - 1) :]}"


def _row(r: LayerHeadroom, report: DoctorReport) -> list[str]:
    errors = {(d.precision, d.module): d.error for d in report.divergence}
    fp16 = _SHORT.get(r.fp16_dtype, r.fp16_dtype) if r.fp16_finite else "inf/NaN"
    if r.fp16_grad_finite is False:
        fp16 += ", grad inf/NaN"
    return [f"{short_name(r.name)} ({r.kind})", _f(r.act_absmax, ".2g"),
            _f(r.act_headroom_bits, ".1f"), _f(r.grad_absmax, ".2g"),
            _f(r.grad_headroom_bits, ".1f"), fp16,
            *[pct(errors.get((p, r.name))) for p in report.settings["precisions"]]]  # fmt: skip


def console_tables(report: DoctorReport, rows: int = 12) -> list[Table]:
    """The headroom table (flagged and lowest-headroom modules), findings, and the fix."""
    s = report.settings
    title = (f"amptrain doctor: fp16 headroom in bits, {s['batches']} batch(es) of "
             f"{s['batch_size']}, gradients at loss scale {s['loss_scale']:g}")  # fmt: skip
    table = Table(title=title, caption=f"verdict: {report.verdict}")
    body = [_row(r, report) for r in _shown(report, rows)]
    for i, header in enumerate(_headers(report)):
        # One line a module at 80 columns: the figures keep their width, the module's name
        # (already cut in the middle) loses its type first.
        least = max([len(row[i]) for row in body] + [4]) if i else None
        table.add_column(header, no_wrap=True, overflow="ellipsis", min_width=least)
    for row in body:
        table.add_row(*row)
    findings = Table(title=f"findings (audit of {report.audit.precision}: {report.audit.reason})")
    for header in ("severity", "where", "finding", "advice"):
        findings.add_column(header, overflow="fold")
    for f in report.findings:
        findings.add_row(f.severity, f.module or "set-up", f.message, f.advice)
    tables = [table, findings, *_probe_table(report.audit.probe)]
    if report.fix is None:
        return tables
    fix = Table(title="--fix (a copy of the model; the original is unchanged)")
    fix.add_column("")
    fix.add_column("before -> after", overflow="fold")
    for key, value in _fix_rows(report.fix).items():
        fix.add_row(key, value)
    return [*tables, fix]


def _probe_rows(probe: dict[str, Any]) -> list[list[str]]:
    ratios = probe["ratio_vs_fp32"]
    return [[p, f"{v:.3g}", f"{ratios[p]:.2f}x", "emulated" if p in probe["emulated"] else "ok"]
            for p, v in probe["tflops"].items()]  # fmt: skip


_PROBE_HEADERS = ("precision", "matmul TFLOP/s", "vs fp32", "here")


def _probe_title(probe: dict[str, Any]) -> str:
    m, k, n = probe["shape"]
    hints = ", ".join(probe["hints"]) or "none"
    return (f"matmul probe on {probe['name']} ({m}x{k}x{n}, {probe['threads']} threads; "
            f"flags, a hint only: {hints})")  # fmt: skip


def _probe_table(probe: dict[str, Any] | None) -> list[Table]:
    if not probe:
        return []
    table = Table(title=_probe_title(probe))
    for header in _PROBE_HEADERS:
        table.add_column(header)
    for row in _probe_rows(probe):
        table.add_row(*row)
    return [table]


def _probe_lines(probe: dict[str, Any] | None) -> list[str]:
    if not probe:
        return []
    lines = ["", f"## {_probe_title(probe)[0].upper()}{_probe_title(probe)[1:]}", ""]
    lines += ["| " + " | ".join(_PROBE_HEADERS) + " |", "|" + "---|" * len(_PROBE_HEADERS)]
    return lines + ["| " + " | ".join(row) + " |" for row in _probe_rows(probe)]


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
    lines += [f"- {f.name}: {getattr(a, f.name)}" for f in dataclasses.fields(a)[3:-1]]
    lines += _probe_lines(a.probe)
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
        from amptrain.doctor.plot import plot_headroom

        plot_headroom(report, run_dir / "headroom.png")
    atomic_write_bytes(run_dir / "report.md", markdown(report).encode())
    return run_dir / "report.md"
