"""The `train` workflow: build model and data from a `TrainConfig`, run `fit`, write the run.

The run directory holds `config.json` (enough to rerun with `amptrain train --config`),
`metrics.jsonl`, `metrics.csv`, `summary.json`, `model.safetensors` (the final weights),
`base.json` and a copy of the tokenizer (so the run loads from wherever it is moved), `hf/`
for a Hugging Face model (see `runs.hf_export`) and, with the `plot` extra, `loss.png`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from amptrain import checkpoint, data, distributed, lora, sharding
from amptrain._imports import MATPLOTLIB_AVAILABLE
from amptrain.config import TrainConfig
from amptrain.errors import Interrupted, Stopped
from amptrain.interrupts import deferred_signals
from amptrain.loop import FitResult, fit
from amptrain.metrics import tracking
from amptrain.metrics.sinks import CsvSink, JsonlSink, Sink
from amptrain.resuming import data_digest
from amptrain.run_opening import open_new, open_resumed, remove_new_run
from amptrain.run_setup import tokenizer_file
from amptrain.runs import (
    atomic_write_json,
    clean_temporaries,
    environment,
    final_files,
)
from amptrain.runs.hf_export import is_hf_model
from amptrain.runs.run_sinks import FastPathRecord, RunDirectoryWatch, record_fast_path

log = logging.getLogger("amptrain")


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """A finished `train` run: its result and where its files are."""

    result: FitResult
    run_dir: Path
    model: nn.Module = dataclasses.field(repr=False, default=None)
    train: data.Blocks = dataclasses.field(repr=False, default=None)
    val: data.Blocks = dataclasses.field(repr=False, default=None)


def run_training(
    cfg: TrainConfig,
    *,
    sinks: list[Sink] | None = None,
    trackers: tracking.Start | None = None,
    command: str = "train",
    resume: str | None = None,
    given: dict[str, Any] | None = None,
    allow_new_scaler: bool = False,
) -> TrainRun:
    """Run the whole `train` job and write its run directory.

    Args:
        cfg: The validated configuration (with `resume`, the run's own config.json wins).
        sinks: Extra sinks (the console progress bar, W&B...), closed when training ends.
        trackers: Starts the trackers' sinks (W&B, TensorBoard, MLflow) for the run
            directory, once it exists and before anything trains; if it raises (a refused
            tracker), a new run directory is removed and the error goes up. Their failures
            during the run are kept in `summary.json` (`tracker_failures`).
        command: Prefix of the run directory's name.
        resume: `auto` (the newest run under `cfg.out` with a complete checkpoint), a run
            directory, or a checkpoint directory; None starts a new run.
        given: With `resume`, the settings the command gave explicitly: they must equal the
            run's, except a larger `max_steps`, which extends it (see `resume_config`).
        allow_new_scaler: Resume fp16 from a checkpoint that has no GradScaler state.

    Raises:
        Interrupted: After SIGINT/SIGTERM, once the checkpoint is saved.
    """
    early = _BeforeTraining(new=resume is None)
    with deferred_signals(early):
        return _train(cfg, sinks, trackers, command, resume, given, allow_new_scaler, early)


class _BeforeTraining:
    """SIGINT/SIGTERM before training: stop at once, leaving nothing of a new run.

    Once training is over (`done`), signals are kept in `received` for the export to decide.
    """

    def __init__(self, new: bool) -> None:
        self.new, self.done, self.received = new, False, []

    def __call__(self, signum: int) -> None:
        if self.done:
            self.received.append(signum)
            return
        kept = "the new run directory is removed" if self.new else "the run is as it was"
        raise Stopped(signum, f"nothing had trained; {kept}")


def _train(
    cfg: TrainConfig,
    sinks: list[Sink] | None,
    trackers: tracking.Start | None,
    command: str,
    resume: str | None,
    given: dict[str, Any] | None,
    allow_new_scaler: bool,
    early: _BeforeTraining,
) -> TrainRun:
    main = distributed.is_main()

    def start(run_dir: Path, created: bool) -> list[Sink]:  # requested trackers, or a refusal
        return tracking.start(trackers, run_dir, created) if main else []

    if resume is None:
        run = open_new(cfg, command)
        started = start(run.run_dir, True)
    else:  # started before the run's files are edited: a refusal leaves them as they were
        run = open_resumed(cfg, resume, command, given or {}, allow_new_scaler, start)
        started = list(run.trackers)
    try:
        if run.lock is not None:
            run.lock.announce()  # the run is checked: a second process is told who has it
        cfg, run_dir, model, train, val, precision = run[:6]
        ckpt, history = run.ckpt, run.history
        sinks = [*(sinks or []), *started]
        if main:  # what a killed process left half-written (this one holds the run's lock)
            checkpoint.clean_temporaries(run_dir / "checkpoints")
            for name in clean_temporaries(run_dir):
                log.info("removed %s, which a stopped process left half-written", name)
        log.info("run directory %s; precision %s (%s)", run_dir, precision.name, precision.reason)
        for sink in sinks if main else []:  # W&B: a resumed run continues the same W&B run
            if getattr(sink, "run_id", None):
                atomic_write_json(run_dir / "wandb.json", {"run_id": sink.run_id})
        # Trackers learn the resolved run; `fit` adds the options it ran with and the fast path.
        tracking.tell_config(sinks, {**cfg.to_dict(), "environment": environment(),
                                     "run_dir": str(run_dir.resolve()),
                                     "precision_requested": cfg.precision,
                                     "precision": precision.name,
                                     "precision_reason": precision.reason})  # fmt: skip
        files: list[Sink] = []
        if main:  # only rank 0 writes files
            files = [RunDirectoryWatch(run_dir), JsonlSink(run_dir / "metrics.jsonl"),
                     CsvSink(run_dir / "metrics.csv"),
                     FastPathRecord(run_dir / "config.json")]  # fmt: skip
        result = fit(
            model, train, val, precision=precision, sinks=[*files, *sinks],
            source=cfg.model, checkpoint_dir=run_dir / "checkpoints", resume=ckpt,
            allow_new_scaler=allow_new_scaler, history=history, handle_signals=True,
            planned=run.planned,
            checkpoint_meta={"config_hash": checkpoint.config_hash(cfg.to_dict()),
                             "max_steps": cfg.fit.max_steps, "data_sha256": data_digest(cfg)},
            **dataclasses.asdict(cfg.fit),
        )  # fmt: skip
        early.done = True  # a signal now skips the plot; the run is checkpointed already
        received = early.received
        weights = sharding.full_state_dict(model)  # gathered from the shards (collective)
        if not main:
            return TrainRun(result, run_dir, model, train, val)
        adapters = None
        if lora.is_lora(model):  # the adapters first, then the merged model as any run's
            adapters = lora.describe(model)
            final_files.save_adapter(model, run_dir)
            model = final_files.merged(model, run_dir)
            weights = model.state_dict()
        final_files.save_weights(weights, run_dir)  # first: what a full disk spares
        record_fast_path(run_dir / "config.json", result.fast_path)
        if is_hf_model(model):
            final_files.export(model, run_dir, tokenizer_file(cfg), weights)  # no collective
        atomic_write_json(run_dir / "summary.json",
                          {**summary(result, cfg, model, sinks), "lora": adapters,
                           "examples": train.about})  # fmt: skip
        if not received:
            _plot(result, run_dir / "loss.png", f"{cfg.model} ({result.precision})")
        if received:
            newest = checkpoint.latest(run_dir / "checkpoints")
            raise Interrupted(received[0], result.steps, newest)
        return TrainRun(result, run_dir, model, train, val)
    except Stopped:
        if resume is None and main and checkpoint.latest(run.run_dir / "checkpoints") is None:
            remove_new_run(run.run_dir, started)
        raise
    finally:
        if run.lock is not None:
            run.lock.release()  # the run's last file is written


def _plot(result: FitResult, path: Path, title: str) -> None:
    """loss.png, an optional after-step: when it fails the run has still succeeded."""
    if not MATPLOTLIB_AVAILABLE:
        log.info("loss.png skipped: install amptrain[plot] for plots")
        return
    from amptrain.runs.plotting import plot_training

    try:
        plot_training(result.history, path, title)
    except Exception as exc:  # noqa: BLE001 - e.g. values matplotlib cannot place on an axis
        log.warning("loss.png not drawn (%s: %s); the run itself is complete and saved",
                    type(exc).__name__, exc)  # fmt: skip


def summary(
    result: FitResult, cfg: TrainConfig, model: nn.Module, sinks: Sequence[Sink] = ()
) -> dict[str, Any]:
    """The figures of `summary.json`, with the failures of trackers among `sinks`."""
    return {
        "model": cfg.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": cfg.data,
        **result.to_dict(),
        "tracker_failures": tracking.failures(sinks),
    }
