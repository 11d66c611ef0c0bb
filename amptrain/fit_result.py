"""What a training run keeps while it runs (`TrainState`) and returns (`FitResult`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from amptrain.hardware import peak_memory_mb
from amptrain.metrics.tracker import Tracker
from amptrain.precision import Precision


@dataclasses.dataclass
class TrainState:
    """Counters of a run; everything a resume needs besides the tensors."""

    step: int = 0
    """Optimizer steps taken, skipped ones included."""
    batches: int = 0
    """Micro-batches consumed: the position in the seeded batch order."""
    tokens: int = 0
    """Target tokens trained on."""
    skipped_steps: int = 0
    """Steps skipped because the gradient norm was inf or NaN."""
    consecutive_nonfinite: int = 0
    """Non-finite steps in a row; training stops at FitOptions.max_nonfinite."""
    last_finite_loss: float = math.nan
    """Training loss of the most recent finite step."""
    last_finite_step: int = -1
    """Step number of that loss."""
    should_stop: bool = False
    """A callback sets this to end training after the current step."""
    stop_signal: int = 0
    """The signal (SIGINT 2, SIGTERM 15) that asked training to stop; 0 if none."""
    eval_pending: bool = False
    """This step's evaluation is owed (a signal came first); a resumed run does it first."""
    evaluating: bool = False
    """An evaluation that a signal may cut short is running."""
    stop_requested: int = 0
    """A stop asked on this process and not yet agreed: the signal, -1 for a callback's, or 0.
    One process agrees at once; several on the next logging, evaluation or checkpoint step."""


@dataclasses.dataclass(frozen=True)
class FitResult:
    """The record of a finished run."""

    precision: str
    reason: str
    device: str
    steps: int
    skipped_steps: int
    tokens: int
    train_time_s: float
    tokens_per_s: float
    final_train_loss: float
    initial_val_loss: float | None
    final_val_loss: float | None
    final_val_accuracy: float | None
    best_val_loss: float | None
    best_step: int | None
    loss_scale: float
    peak_mem_mb: float
    mem_source: str
    fast_path: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The step's kernels and why: optimizer, attention backend, loss, compilation (seconds)."""
    history: tuple[dict[str, Any], ...] = dataclasses.field(repr=False, default=())
    precision_warning: str | None = None
    precision_probe: dict[str, Any] | None = None

    def to_dict(self, history: bool = False) -> dict[str, Any]:
        """Plain values; the per-step history only when asked for."""
        out = dataclasses.asdict(self)
        if not history:
            out.pop("history")
        return out


def fit_result(
    prec: Precision, state: TrainState, tracker: Tracker, train_time: float
) -> FitResult:
    """The record of a finished run from its counters, its metric records and its peak memory."""
    steps = [r for r in tracker.records if "train/loss" in r]
    evals = tracker.evaluations()
    best = tracker.best("val/loss")
    peak, source = peak_memory_mb(prec.device)
    return FitResult(
        precision=prec.name,
        reason=prec.reason,
        device=str(prec.device),
        steps=state.step,
        skipped_steps=state.skipped_steps,
        tokens=state.tokens,
        train_time_s=train_time,
        tokens_per_s=state.tokens / train_time if train_time > 0 else 0.0,
        final_train_loss=steps[-1]["train/loss"] if steps else math.nan,
        initial_val_loss=evals[0]["val/loss"] if evals else None,
        final_val_loss=evals[-1]["val/loss"] if evals else None,
        final_val_accuracy=evals[-1]["val/accuracy"] if evals else None,
        best_val_loss=best["val/loss"] if best else None,
        best_step=best["step"] if best else None,
        loss_scale=prec.loss_scale,
        peak_mem_mb=peak,
        mem_source=source,
        history=tuple(tracker.records),
        precision_warning=prec.warning,
        precision_probe=prec.probe_figures(),
    )
