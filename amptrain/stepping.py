"""The steps of a training run: batches through `step.train_step`, with the bookkeeping around.

`loop.fit` checks the input and sets the run up (precision, sharding, optimizer, the fast
path), then hands a `Loop` to `run_loop`: metrics to the sinks, the non-finite policy,
evaluation, checkpoints, callbacks and signals. Rank-specific work is confined to the batch
source, the sinks and rank 0's checkpoint writes, so the same loop runs under `torchrun`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import checkpoint, distributed, resharding, rng, step_metrics
from amptrain import data as data_mod
from amptrain.allocator import StepFaults
from amptrain.attention import AttentionPlan
from amptrain.callbacks import Callback, emit
from amptrain.compiling import LossFn
from amptrain.config import FitOptions
from amptrain.fit_result import TrainState
from amptrain.interrupts import EvalCut, agree_on_stop
from amptrain.metrics.meters import Throughput
from amptrain.metrics.sinks import Sink
from amptrain.precision import Precision
from amptrain.step import DeviceCounters, device_clock, evaluate, to_device, train_step

log = logging.getLogger("amptrain")


@dataclasses.dataclass
class Loop:
    """Everything one training run works on."""

    model: nn.Module
    net: nn.Module  # what the step calls: `model` (one process, or sharded) or its DDP wrapper
    train: data_mod.Blocks
    val: data_mod.Blocks | None
    prec: Precision
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    opts: FitOptions
    state: TrainState
    sinks: list[Sink]
    callbacks: list[Callback]
    checkpoint_dir: str | Path | None
    checkpoint_meta: dict[str, Any]
    attention: AttentionPlan
    shards: bool  # checkpoints in the sharded format (DCP), not rank 0's full files
    faults: StepFaults  # the first steps' page faults, and the allocator's record
    loss_fn: LossFn | None = None  # the forward+loss of one micro-batch; None: eager
    gather_grads: Any = None  # bf16 weights' fp32 gradient sums, before the step reads them
    last_checkpoint: Path | None = None
    saved_step: int = -1


def run_loop(run: Loop) -> float:
    """Steps until `max_steps` or a stop request; returns the seconds spent training.

    A stop request (a signal, or a callback) always ends with the newest step checkpointed.
    """
    model, opts, state = run.model, run.opts, run.state
    device = next(model.parameters()).device
    rank, world_size = distributed.world()
    batches = data_mod.batches(run.train, opts.batch_size, opts.seed, start=state.batches,
                               rank=rank, world_size=world_size,
                               window=opts.grad_accum)  # fmt: skip
    if run.val is not None and (state.step == 0 or state.eval_pending):
        _eval_and_log(run)  # the first one, or the one a signal interrupted before the resume
    agree_on_stop(state)  # a stop asked before the first step (`on_fit_start`), on every rank
    clock = device_clock(device)
    meter, train_time = Throughput(clock), 0.0
    counters = DeviceCounters(device, state.skipped_steps, state.consecutive_nonfinite)
    while state.step < opts.max_steps and not state.should_stop:
        window = [to_device(next(batches), device) for _ in range(opts.grad_accum)]
        with run.faults.step(state.step + 1):
            out = train_step(run.net, window, run.prec, run.optimizer, run.scheduler, opts,
                             run.attention.context, run.loss_fn, run.gather_grads)  # fmt: skip
        state.step, state.batches = state.step + 1, state.batches + opts.grad_accum
        counters.add(out, state.step)
        metrics: dict[str, Any] = {}
        last = state.step == opts.max_steps
        due = opts.checkpoint_every and state.step % opts.checkpoint_every == 0
        eval_due = run.val is not None and state.step % opts.eval_every == 0
        # Reading the counters is a host sync, and so is agreeing on a stop across processes:
        # both only on steps that every rank knows to be such steps.
        synced = state.step % opts.log_every == 0 or last or due or eval_due
        if synced or (world_size == 1 and state.stop_requested):  # one process logs its last
            metrics = step_metrics.log_step(_reading(run), counters, meter, out.lr)
        emit(run.callbacks, "on_step_end", state, metrics)
        agree_on_stop(state, synced)
        if state.should_stop and counters.pending:
            step_metrics.read_counters(
                _reading(run), counters, out.lr
            )  # a stop: the checkpoint needs them
        stop = last or (state.should_stop and not state.stop_signal)
        state.eval_pending = run.val is not None and (state.step % opts.eval_every == 0 or stop)
        # After a signal the grace period may be short: checkpoint at once, evaluate on resume.
        if state.eval_pending and not state.stop_signal:
            train_time += device_clock(device) - clock
            _eval_and_log(run)
            clock = device_clock(device)
            meter = Throughput(clock)
        if run.checkpoint_dir is not None and (due or last or state.should_stop):
            _save_checkpoint(run)
        if world_size == 1:  # a signal during the evaluation or the checkpoint: stop here
            agree_on_stop(state)
    unsaved = run.checkpoint_dir is not None and run.saved_step != state.step
    if unsaved and (state.stop_signal or state.step == opts.max_steps):
        _save_checkpoint(run)  # a signal in the first evaluation, or the owed one just done
    return train_time + device_clock(device) - clock


def _save_checkpoint(run: Loop) -> None:
    """Rank 0 writes, with every rank's RNG state; the others wait for it (or write shards)."""
    rngs = distributed.gather(rng.state(next(run.model.parameters()).device))
    if run.shards:  # every rank writes its shards (under DDP DCP writes each tensor once)
        path = resharding.save(
            run.checkpoint_dir, run.model, run.optimizer, run.scheduler, run.prec, run.state,
            rngs, run.checkpoint_meta, run.opts.keep_last,
        )  # fmt: skip
        run.last_checkpoint, run.saved_step = path, run.state.step
        return
    path, failed = None, None
    # Gathered from the shards under FSDP (collective), rank 0's own state otherwise.
    captured = resharding.capture_full(run.model, run.optimizer, run.scheduler, run.prec,
                                       run.state, rngs)  # fmt: skip
    if captured is not None:  # rank 0
        tensors, counters = captured
        try:
            path = checkpoint.save(
                run.checkpoint_dir, run.state.step, tensors, {**counters, **run.checkpoint_meta},
                run.opts.keep_last,
            )  # fmt: skip
        except checkpoint.CheckpointWriteError as exc:  # every rank stops with it, not waits
            failed = exc
        else:
            log.debug("checkpoint %s saved", path)
    path, message = distributed.broadcast((path, None if failed is None else str(failed)))
    if failed is not None:
        raise failed
    if message is not None:  # rank 0 says it; the other ranks stop with the same code
        raise distributed.said_by_rank_0(checkpoint.CheckpointWriteError(message))
    run.last_checkpoint, run.saved_step = path, run.state.step


def _reading(run: Loop) -> step_metrics.Reading:
    return step_metrics.Reading(run.state, run.sinks, run.prec, run.optimizer, run.scheduler,
                                run.opts, next(run.model.parameters()).device)  # fmt: skip


def _eval_and_log(run: Loop) -> None:
    """Evaluate, log and call back; a signal may cut it short (one process only), leaving it owed.

    Under torch.distributed every rank must finish the evaluation's collectives, so there it
    runs to the end and the ranks then agree on stopping.
    """
    opts, state = run.opts, run.state
    state.eval_pending = True
    try:
        state.evaluating = distributed.world()[1] == 1
        metrics = evaluate(run.model, run.val, run.prec, opts.batch_size, opts.eval_batches,
                           opts.ignore_index, run.attention.context)  # fmt: skip
    except EvalCut:
        run.model.train()
        return
    finally:
        state.evaluating = False
    state.eval_pending = False
    step_metrics.to_sinks(run.sinks, metrics, state.step)
    emit(run.callbacks, "on_eval_end", state, metrics)
    agree_on_stop(state, synced=True)
