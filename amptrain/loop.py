"""The training loop: `fit()` runs optimizer steps over seeded batches.

It validates the input before any kernel runs, sets the run up (levers, sharding, optimizer,
the fast path, a resume), then `stepping.run_loop` repeats `step.train_step()` with the
bookkeeping around it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import data as data_mod
from amptrain import (
    distributed,
    low_weights,
    memory_plan,
    recompute,
    resharding,
    sharding,
)
from amptrain.allocator import StepFaults
from amptrain.callbacks import Callback, emit
from amptrain.checkpoint import Checkpoint
from amptrain.compiling import compiled_graphs
from amptrain.config import FitOptions
from amptrain.errors import Interrupted
from amptrain.fast_path import plan_fast_path
from amptrain.fit_result import FitResult, TrainState, fit_result
from amptrain.hardware import reset_peak_memory
from amptrain.interrupts import deferred_signals, stop_handler
from amptrain.metrics import tracking
from amptrain.metrics.sinks import Sink
from amptrain.metrics.tracker import Tracker
from amptrain.optim import make_optimizer, make_scheduler, reset_lr, state_format
from amptrain.precision import Precision
from amptrain.preflight import check_data, preflight
from amptrain.step import evaluate, train_step
from amptrain.stepping import Loop, run_loop

__all__ = ["FitResult", "TrainState", "check_data", "evaluate", "fit", "preflight", "train_step"]

log = logging.getLogger("amptrain")


def fit(
    model: nn.Module,
    train: object,
    val: object | None = None,
    *,
    precision: str | Precision = "auto",
    sinks: Iterable[Sink] = (),
    callbacks: Iterable[Callback] = (),
    source: str = "model",
    checkpoint_dir: str | Path | None = None,
    resume: Checkpoint | None = None,
    allow_new_scaler: bool = False,
    history: Sequence[dict[str, Any]] = (),
    handle_signals: bool = False,
    checkpoint_meta: dict[str, Any] | None = None,
    planned: dict[str, Any] | None = None,
    **options: Any,
) -> FitResult:
    """Train `model` in place on `train` with the given precision; evaluate on `val`.

    The model trains on the device its parameters are on. Before any training kernel runs,
    the options are validated, the model is probed with one dry-run forward to learn its
    vocabulary size, and every token id of the data is checked against it.

    Args:
        model: Any module mapping token ids `[B, T]` to logits `[B, T, V]` (see `adapter`).
        train: `Blocks`, a 2-D integer tensor, a list of token lists, or a dict with `input_ids`.
        val: The same kinds; None skips evaluation.
        precision: `fp32`, `tf32`, `fp16`, `bf16`, `auto`, a Lightning alias, or a `Precision`.
        sinks: Where metrics go, besides the returned history.
        callbacks: `Callback` objects.
        source: How to name the model in error messages (e.g. its file and symbol).
        checkpoint_dir: Save checkpoints here every `checkpoint_every` steps, at the end, and
            when interrupted; None saves nothing.
        resume: A loaded checkpoint to continue from, bit for bit.
        allow_new_scaler: Resume fp16 from a checkpoint without GradScaler state.
        history: Metric records of the run before `resume`, for the result's summary.
        handle_signals: On SIGINT/SIGTERM finish the step, checkpoint, raise `Interrupted`.
        checkpoint_meta: JSON values stored in every checkpoint's trainer.json (config hash).
        planned: The record of a memory plan the options already carry (`memory_plan.plan`,
            made by the caller before its run directory): it is recorded, not made again.
        **options: `FitOptions` fields: `max_steps`, `batch_size`, `lr`, `grad_accum`...

    Returns:
        A `FitResult` with the final and best figures and the metric history.

    Raises:
        ConfigError, DataError, ModelError, PrecisionError: For bad input, before training.
        CheckpointError: If `resume` does not fit this model or precision.
        NonFiniteError: After `max_nonfinite` consecutive non-finite steps.
        Interrupted: After a handled signal, once the checkpoint is saved.
    """
    opts, prec, train_b, val_b = preflight(model, train, val, precision=precision, source=source,
                                           resume=resume, allow_new_scaler=allow_new_scaler,
                                           **options)  # fmt: skip
    prec.warn_if_emulated()  # before any training kernel, with the measured figures
    if resume is not None and memory_plan.wanted(opts):  # the split its run chose
        opts = memory_plan.resumed(opts, resume.trainer)
    elif memory_plan.wanted(opts):  # a micro-batch (and checkpointing) measured to fit
        opts, planned = memory_plan.plan(model, train_b, prec, opts)
    recomputed = recompute.apply(model, opts.activation_checkpointing)  # checkpoint, shard, compile
    lowered = low_weights.cast(model, opts.weights)  # bf16 matrices for the run (bf16-true)
    try:
        return _fit(model, train_b, val_b, prec, opts, recomputed, lowered, sinks=sinks,
                    callbacks=callbacks, checkpoint_dir=checkpoint_dir, resume=resume,
                    allow_new_scaler=allow_new_scaler, history=history,
                    handle_signals=handle_signals, checkpoint_meta=checkpoint_meta,
                    planned=planned)  # fmt: skip
    finally:
        lowered.undo()  # fp32 again, exactly
        recomputed.undo()  # the blocks' own forward again


def _fit(
    model: nn.Module,
    train_b: data_mod.Blocks,
    val_b: data_mod.Blocks,
    prec: Precision,
    opts: FitOptions,
    recomputed: recompute.Recompute,
    lowered: low_weights.Lowered,
    *,
    sinks: Iterable[Sink],
    callbacks: Iterable[Callback],
    checkpoint_dir: str | Path | None,
    resume: Checkpoint | None,
    allow_new_scaler: bool,
    history: Sequence[dict[str, Any]],
    handle_signals: bool,
    checkpoint_meta: dict[str, Any] | None,
    planned: dict[str, Any] | None,
) -> FitResult:
    """`fit` once its input is checked and its blocks checkpointed as asked."""
    rank, world_size = distributed.world()
    shards = sharding.shard(model, prec, opts.strategy, world_size)  # before the optimizer
    if shards["sharded"]:
        lowered.follow_shards(model)  # the shards, not the whole bf16 tensors
    optimizer = make_optimizer(model, opts)
    scheduler = make_scheduler(optimizer, opts)
    tracker, state = Tracker(), TrainState()
    tracker.records.extend(history)
    torch.manual_seed(opts.seed)  # dropout and other in-model randomness repeat for a seed
    if resume is not None:
        resharding.restore(resume, model, optimizer, scheduler, prec, state, allow_new_scaler)
        reset_lr(optimizer, scheduler, opts)  # an extended run's schedule, from now on
    net = sharding.wrap(model, world_size)  # DDP's wrapper, or the sharded model itself
    if lowered.params and world_size > 1:  # bf16 gradients summed in fp32: a hook under DDP,
        if net is not model:  # the policy's reduce dtype under FSDP2
            net.register_comm_hook(None, low_weights.fp32_allreduce)
        lowered.record["gradient_reduction"] = "fp32"
    with prec.activate():  # the fast path is decided and timed in the run's matmul mode (TF32)
        attn, compiled, loss_fn, fast_path = plan_fast_path(model, net, train_b, prec, optimizer,
                                                            opts, resume, state.step)  # fmt: skip
        fast_path["sharding"] = shards
        if lowered.params and opts.grad_accum > 1 and not shards["sharded"]:
            lowered.accumulate_in_fp32()  # after the fast path's timed passes; FSDP2 sums in fp32
        fast_path.update(recomputed.record)
        fast_path.update(lowered.record)
        if planned:
            fast_path["memory_plan"] = planned
        sinks = [tracker, *sinks] if rank == 0 else [tracker]  # files and console on rank 0 only
        resolved = {"fit": dataclasses.asdict(opts), "precision": prec.name,
                    "precision_reason": prec.reason, "fast_path": fast_path}  # fmt: skip
        tracking.tell_config(sinks, resolved)  # trackers log the run as it runs, not as asked
        meta = {**(checkpoint_meta or {}), "world_size": world_size, "attention": attn.backend,
                "batch_size": opts.batch_size, "strategy": opts.strategy,
                "checkpoint_format": opts.checkpoint_format,
                "weights": opts.weights,
                "optimizer_format": state_format(opts, shards["sharded"]),
                "activation_checkpointing": opts.activation_checkpointing}  # fmt: skip
        shard_files = resharding.writes_shards(opts.checkpoint_format, sharding.is_sharded(model))
        run = Loop(model, net, train_b, val_b, prec, optimizer, scheduler, opts, state, sinks,
                    list(callbacks), checkpoint_dir, meta, attn, shard_files,
                    StepFaults(opts.allocator, next(model.parameters()).device,
                               sharding.is_sharded(model)), loss_fn,
                    lowered.gather if lowered.hooks else None)  # fmt: skip
        model.train()
        reset_peak_memory(next(model.parameters()).device)  # this run's peak, from here on
        with deferred_signals(stop_handler(state), handle_signals):
            emit(run.callbacks, "on_fit_start", state)
            graphs = compiled_graphs()
            try:
                train_time = run_loop(run)
            finally:
                compiled.undo()
                emit(run.callbacks, "on_fit_end", state)
                for sink in run.sinks:
                    sink.close()
    fast_path.update(run.faults.record)
    if compiled.loss_fn is not None:  # a shape or guard change during training recompiles
        fast_path["recompiles"] = compiled_graphs() - graphs
        if fast_path["recompiles"]:
            log.warning("the compiled step was recompiled %d time(s) during training",
                        fast_path["recompiles"])  # fmt: skip
    if state.stop_signal:
        raise Interrupted(state.stop_signal, state.step, run.last_checkpoint)
    return dataclasses.replace(fit_result(prec, state, tracker, train_time), fast_path=fast_path)
