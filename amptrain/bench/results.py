"""What a benchmark reports: one row per arm (`ArmResult`), and the report (`BenchReport`)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ArmResult:
    """One precision's figures. Fields that compare with fp32 are None for fp32 itself."""

    precision: str
    status: str  # "ok", "failed", "oom" or "skipped" (emulated here; see `error`)
    reason: str
    error: str | None = None
    step_ms: float | None = None
    step_ms_iqr: tuple[float, float] | None = None
    repeat_ms_range: tuple[float, float] | None = None
    tokens_per_s: float | None = None
    speedup_vs_fp32: float | None = None
    peak_mem_mb: float | None = None
    mem_mb: float | None = None
    mem_source: str | None = None
    mem_reduction_vs_fp32: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_loss_rel_diff: float | None = None
    val_accuracy_diff: float | None = None
    quality_ok: bool | None = None
    loss_scale: float | None = None
    skipped_steps: int | None = None
    scale_backoffs: int | None = None
    scale_growths: int | None = None
    achieved_tflops: float | None = None
    probe_tflops: float | None = None
    peak_source: str | None = None
    datasheet_tflops: float | None = None
    mfu_probe: float | None = None
    mfu_datasheet: float | None = None
    init_digest: str | None = None
    batch_digest: str | None = None
    loss_curve: tuple[float, ...] = ()
    sharding: dict[str, Any] | None = None
    """How the processes shared the model in this arm (`fit`'s record: strategy, policy)."""
    allocator: dict[str, Any] | None = None
    """Whether this arm's host memory was kept for reuse, and the page faults that decided it
    (`fit`'s record, `amptrain.allocator`): it moves CPU step times and peak RSS."""
    levers: dict[str, Any] | None = None
    """What the arm's run used for memory (`fit`'s record): weights, optimizer, checkpointing."""
    largest_batch: int | None = None
    """With a memory budget: the largest batch whose training step fits it (`largest`)."""
    largest_depth: int | None = None
    """With a memory budget: the most repeated blocks (copies of the model's first) whose step
    at the benchmark's batch fits it, the model's width kept (`largest`)."""


@dataclasses.dataclass(frozen=True)
class BenchReport:
    """All arms, the verdict, and the conditions of the measurement."""

    arms: tuple[ArmResult, ...]
    best: str | None
    verdict: str
    targets: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    environment: dict[str, Any]
    probe: dict[str, Any] = dataclasses.field(default_factory=dict)
    memory_verdict: str = ""
    """The arm cheapest in memory that keeps quality (and fits the budget, where one is given)."""

    def arm(self, precision: str) -> ArmResult:
        """The row of one precision."""
        return next(a for a in self.arms if a.precision == precision)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return dataclasses.asdict(self)
