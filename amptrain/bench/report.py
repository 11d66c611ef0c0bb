"""Show and save a `BenchReport`: console table, bench.json, bench.csv, bench.png and report.md."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

from rich.table import Table

from amptrain._imports import MATPLOTLIB_AVAILABLE
from amptrain.bench import ArmResult, BenchReport
from amptrain.config import TrainConfig
from amptrain.runs import atomic_write_bytes, atomic_write_json, create_run_dir, write_config

CSV_FIELDS = (
    "precision", "status", "step_ms", "step_ms_p25", "step_ms_p75", "tokens_per_s",
    "speedup_vs_fp32", "mem_mb", "peak_mem_mb", "mem_reduction_vs_fp32", "mem_source",
    "train_loss", "val_loss", "val_accuracy", "val_loss_rel_diff", "val_accuracy_diff",
    "quality_ok", "loss_scale", "skipped_steps", "scale_backoffs", "scale_growths",
    "achieved_tflops", "probe_tflops", "datasheet_tflops", "mfu_probe", "mfu_datasheet",
    "reason", "error", "device", "torch", "threads", "precisions", "processes", "strategy",
    "largest_batch", "largest_depth",
)  # fmt: skip


def _fmt(value: object, spec: str = ".3g", pct: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if pct:
        return f"{value:+.1%}"
    return format(value, spec) if isinstance(value, float) else str(value)


def _columns(a: ArmResult) -> list[str]:
    if a.status == "skipped":
        return [a.precision, a.error or "skipped", *["-"] * 11]
    if a.status != "ok":
        return [a.precision, f"{a.status.upper()}: {(a.error or '')[:80]}", *["-"] * 11]
    spread = f"{a.step_ms_iqr[0]:.1f}-{a.step_ms_iqr[1]:.1f}"
    return [
        a.precision, f"{a.step_ms:.1f} ({spread})", f"{a.tokens_per_s:,.0f}",
        _fmt(a.speedup_vs_fp32, ".2f"), _fmt(a.mem_mb, ".0f"),
        _fmt(a.mem_reduction_vs_fp32, ".0%"), f"{a.val_loss:.4f}",
        _fmt(a.val_loss_rel_diff, pct=True), _fmt(a.quality_ok), _fmt(a.mfu_probe, ".1%"),
        _scale_story(a), _fmt(a.largest_batch), _fmt(a.largest_depth),
    ]  # fmt: skip


HEADERS = ["arm", "step ms, median (IQR)", "tokens/s", "speedup", "memory MB",
           "memory saved vs fp32", "val loss", "val loss vs fp32", "quality ok", "MFU (probe)",
           "loss scale", "largest batch in budget", "most blocks in budget"]  # fmt: skip


def _scale_story(a: ArmResult) -> str:
    if a.precision != "fp16":
        return "-"
    return f"{a.loss_scale:g}; {a.skipped_steps} skipped, {a.scale_backoffs} back-offs"


def console_table(report: BenchReport) -> Table:
    """The arms as a rich table: one column per precision, so it fits a narrow terminal."""
    title = bench_title(report)
    memory = f"\n{report.memory_verdict}" if report.memory_verdict else ""
    caption = f"verdict: {report.verdict}{memory}\n{probe_line(report.probe)}"
    table = Table(title=title, caption=caption)
    table.add_column("", style="bold", overflow="fold")
    for arm in report.arms:
        table.add_column(arm.precision, overflow="fold")
    cells = [_columns(arm) for arm in report.arms]
    for i, header in enumerate(HEADERS[1:], start=1):
        table.add_row(header, *[c[i] if i < len(c) else "" for c in cells])
    return table


def bench_title(report: BenchReport) -> str:
    """What was measured where: the device, torch, threads, repeats and steps."""
    s, env = report.settings, report.environment
    where = env["device"] + _processes(s)
    return (f"amptrain bench on {where} (torch {env['torch']}, "
            f"{env['cpu_threads']} threads): {s['repeats']} interleaved repeats x "
            f"{s['steps']} steps, {s['warmup']} warm-up")  # fmt: skip


def _processes(settings: dict[str, Any]) -> str:
    """The title's "x 2 processes (fsdp)" for several processes; nothing for one."""
    n = settings.get("processes", 1)
    return f" x {n} processes ({settings.get('strategy', 'ddp')})" if n > 1 else ""


def probe_line(probe: dict) -> str:
    """The capability probe in one line: "probe on AMD EPYC: fp32 0.07, bf16 0.18 TFLOP/s"."""
    if not probe:
        return "probe: none for this device"
    speeds = ", ".join(f"{p} {v:.3g}" for p, v in probe["tflops"].items())
    emulated = f"; emulated here: {', '.join(probe['emulated'])}" if probe["emulated"] else ""
    return f"matmul probe on {probe['name']}: {speeds} TFLOP/s{emulated}"


def write_report(report: BenchReport, run_dir: str | Path, preface: str = "") -> Path:
    """Write bench.json, bench.csv, report.md and (with the plot extra) bench.png to `run_dir`.

    `preface` is Markdown put before the benchmark in report.md.
    """
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "bench.json", report.to_dict())
    atomic_write_bytes(run_dir / "bench.csv", _csv(report).encode())
    if MATPLOTLIB_AVAILABLE:
        from amptrain.runs.plotting import plot_bench

        plot_bench(report, run_dir / "bench.png", f"{bench_title(report)}\n{report.verdict}")
    atomic_write_bytes(run_dir / "report.md", (preface + markdown(report)).encode())
    return run_dir


def _csv(report: BenchReport) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    env = report.environment
    for arm in report.arms:
        row = {k: v for k, v in arm.__dict__.items() if k != "loss_curve"}
        if arm.step_ms_iqr:
            row["step_ms_p25"], row["step_ms_p75"] = arm.step_ms_iqr
        row.update(device=env["device"], torch=env["torch"], threads=env["cpu_threads"],
                   precisions=" ".join(report.settings["precisions"]),
                   processes=report.settings.get("processes", 1),
                   strategy=report.settings.get("strategy", "ddp"))  # fmt: skip
        writer.writerow(row)
    return out.getvalue()


def markdown(report: BenchReport) -> str:
    """report.md: the table, the verdict, the original targets and the conditions."""
    s, env = report.settings, report.environment
    lines = ["# Precision benchmark", "", f"**Verdict:** {report.verdict}", ""]
    if report.memory_verdict:
        lines[-1:-1] = ["", f"**Memory:** {report.memory_verdict}"]
    lines += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_columns(a)) + " |" for a in report.arms]
    lines += ["", "## Original tier-3 targets, as measured", ""]
    for name, checks in report.targets.items():
        verdicts = ", ".join(f"{k}: {_fmt(v)}" for k, v in checks.items())
        lines.append(f"- {name}: {verdicts}")
    lines += ["", "## Conditions", ""]
    lines += [
        f"- device {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
        f"torch {env['torch']}, CUDA {env['cuda']}, {env['cpu_threads']} CPU threads, "
        f"CPU bf16 features: {', '.join(env['cpu_bf16_features']) or 'none'}",
        f"- {s['repeats']} repeats interleaved across arms, {s['steps']} steps each, first "
        f"{s['warmup']} not timed; batch {s['batch_size']} x context {s['context']}; "
        f"seed {s['seed']}; identical initial weights and batches, checked by digest",
        f"- quality: validation loss on the same {s['eval_batches']} held-out batches; ok "
        f"within {s['quality_tol']:.0%} of fp32",
        f"- {probe_line(report.probe)} (flags are hints: "
        f"{', '.join(report.probe.get('hints', ())) or 'none'})",
        f"- model FLOPs per token {s['flops_per_token']:.4g}, {s['flops_counted_how']}; MFU "
        "against the best matmul probe of the same dtype, at the capability shape and the "
        "model's own (datasheet peak in bench.json where known)",
        f"- memory: {next((a.mem_source for a in report.arms if a.mem_source), 'not measured')}",
        *_sharing(report),
    ]
    for arm in report.arms:
        lines.append(f"- {arm.precision}: {arm.reason}")
    return "\n".join(lines) + "\n"


def _sharing(report: BenchReport) -> list[str]:
    """The conditions lines of a benchmark on several processes: how they shared the model."""
    s = report.settings
    if s.get("processes", 1) == 1:
        return []
    lines = [
        f"- {s['processes']} processes, strategy {s['strategy']}: batch {s['batch_size']} per "
        f"process; tokens/s counts every process's tokens (rank 0's clock); memory is per "
        "process, the largest of them; MFU per device",
    ]
    for arm in report.arms:
        record = arm.sharding or {}
        if record.get("sharded"):
            lines.append(f"- {arm.precision} sharded as {record['units']}: parameters gathered "
                         f"in {record['param_dtype']}, gradients reduced in "
                         f"{record['reduce_dtype']}")  # fmt: skip
    return lines


def run_bench(
    cfg: TrainConfig,
    *,
    precisions: list[str] | None = None,
    steps: int = 30,
    warmup: int = 5,
    repeats: int = 3,
    quality_tol: float = 0.02,
    memory: bool = True,
    run_dir: Path | None = None,
    settings: dict[str, Any] | None = None,
    levers: bool = False,
) -> tuple[BenchReport, Path | None]:
    """The `bench` command: build model and data like `train`, benchmark, write the report.

    `settings` are the command's own options, recorded in `config.json` to rerun it. Under
    torch.distributed every rank benchmarks and rank 0 alone writes; the others get
    `(report, None)`.
    """
    from amptrain import distributed
    from amptrain.bench import bench, ranks
    from amptrain.run_setup import lora_settings, prepare

    ranks.check_strategy(cfg.fit.strategy, distributed.world()[1])
    adapters = lora_settings(cfg) if cfg.lora else None
    model, train, val, _ = prepare(dataclasses.replace(cfg, lora=0))  # the arms add adapters
    report = bench(
        model, train, val, precisions=precisions, steps=steps, warmup=warmup, repeats=repeats,
        batch_size=cfg.fit.batch_size, lr=cfg.fit.lr, seed=cfg.fit.seed,
        eval_batches=cfg.fit.eval_batches, quality_tol=quality_tol, memory=memory,
        compile=cfg.fit.compile, strategy=cfg.fit.strategy, source=cfg.model, adapters=adapters,
        levers=levers, memory_budget=cfg.fit.memory_budget,
    )  # fmt: skip
    if not distributed.is_main():
        return report, None
    run_dir = run_dir or create_run_dir(cfg.out, "bench")
    write_config(run_dir, "bench", cfg, settings)
    return report, write_report(report, run_dir)
