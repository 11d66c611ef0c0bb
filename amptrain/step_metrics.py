"""What a logged step reports: the device counters read, throughput, peak memory, the policy.

The loop reads the step's device counters only on logging steps (a host sync), takes steps
skipped since the last read back from the schedule, and stops the run after `max_nonfinite`
consecutive non-finite steps.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from amptrain import distributed
from amptrain.config import FitOptions
from amptrain.errors import NonFiniteError
from amptrain.fit_result import TrainState
from amptrain.hardware import peak_memory_mb
from amptrain.metrics.meters import Throughput
from amptrain.metrics.sinks import Sink
from amptrain.optim import reset_lr
from amptrain.precision import Precision
from amptrain.step import DeviceCounters, device_clock

log = logging.getLogger("amptrain")


@dataclasses.dataclass(frozen=True)
class Reading:
    """What reading a step's counters updates and reports to: the run's state and objects."""

    state: TrainState
    sinks: Sequence[Sink]
    prec: Precision
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    opts: FitOptions
    device: torch.device


def log_step(run: Reading, counters: DeviceCounters, meter: Throughput, lr: float) -> dict:
    """Read the counters, log the step's metrics, apply the non-finite policy; the metrics.

    Raises:
        NonFiniteError: After `max_nonfinite` consecutive non-finite steps.
    """
    steps = counters.pending  # the steps since the last read: the meter's window
    metrics = read_counters(run, counters, lr)
    meter.update(metrics.pop("tokens"), steps)
    metrics.update(meter.compute(device_clock(run.device)))
    metrics.update(_memory(run.device))
    to_sinks(run.sinks, metrics, run.state.step)
    if run.state.consecutive_nonfinite >= run.opts.max_nonfinite:
        raise _nonfinite_error(run.prec, run.state)
    return metrics


def read_counters(run: Reading, counters: DeviceCounters, lr: float) -> dict[str, Any]:
    """Read the device counters into the state; the step metrics, plus `tokens` since last read.

    Steps skipped since the last read are taken back from the schedule here (the step
    stepped the scheduler as if they were real updates).
    """
    state, read = run.state, counters.read()
    skipped = int(read["skipped"]) - state.skipped_steps
    state.tokens += int(read["tokens"])
    state.skipped_steps = int(read["skipped"])
    state.consecutive_nonfinite = int(read["consecutive"])
    state.last_finite_loss = read["last_finite_loss"]
    state.last_finite_step = int(read["last_finite_step"])
    if skipped:
        run.scheduler.last_epoch -= skipped
        reset_lr(run.optimizer, run.scheduler, run.opts)
        log.info("%d step(s) up to step %d had a non-finite gradient norm and were skipped; "
                 "loss scale now %g", skipped, state.step, run.prec.loss_scale)  # fmt: skip
    return {
        "train/loss": read["loss"],
        "train/lr": lr,
        "train/grad_norm": read["grad_norm"],
        "amp/loss_scale": run.prec.loss_scale,
        "amp/skipped_steps": state.skipped_steps,
        "tokens": int(read["tokens"]),
    }


def to_sinks(sinks: Sequence[Sink], metrics: Mapping[str, Any], step: int) -> None:
    """Give the metrics of `step` to every sink."""
    for sink in sinks:
        sink.log(metrics, step)


def _memory(device: torch.device) -> dict[str, Any]:
    peak, source = peak_memory_mb(device)
    (peak,) = distributed.all_reduce([peak], "max")  # the rank that needs the most
    return {"mem/peak_mb": peak, "mem/source": source}


def _nonfinite_error(prec: Precision, state: TrainState) -> NonFiniteError:
    first = state.step - state.consecutive_nonfinite + 1
    return NonFiniteError(
        f"{state.consecutive_nonfinite} consecutive non-finite steps (steps {first}-"
        f"{state.step}); loss scale fell to {prec.loss_scale:g}; last finite loss "
        f"{state.last_finite_loss:.4f} at step {state.last_finite_step}. Try a lower --lr, "
        "--precision bf16, or `amptrain doctor` to find the overflowing layer"
    )
