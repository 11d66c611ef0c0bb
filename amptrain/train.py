"""The `train` workflow: build model and data from a `TrainConfig`, run `fit`, write the run.

The run directory holds `config.json` (enough to rerun with `amptrain train --config`),
`metrics.jsonl`, `metrics.csv`, `summary.json`, `model.safetensors` (the final weights),
`base.json` and a copy of the tokenizer (so the run loads from wherever it is moved), `hf/`
for a Hugging Face model (see `runs.hf_export`) and, with the `plot` extra, `loss.png`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from amptrain import checkpoint, data, distributed, lora, memory_plan, sharding
from amptrain._imports import MATPLOTLIB_AVAILABLE
from amptrain.config import TrainConfig
from amptrain.data.tokenizers import SETTINGS_FILES
from amptrain.errors import (
    Interrupted,
    Stopped,
)
from amptrain.interrupts import deferred_signals
from amptrain.loop import FitResult, fit
from amptrain.metrics import tracking
from amptrain.metrics.sinks import CsvSink, JsonlSink, Sink
from amptrain.models import check_trusted, provenance
from amptrain.models.provenance import BASE_FILE
from amptrain.precision import Precision
from amptrain.preflight import preflight
from amptrain.resume_config import resumed_config
from amptrain.resuming import (
    check_config_hash,
    check_data,
    data_digest,
    find_resume,
    saved_config,
    truncate_metrics,
)
from amptrain.run_setup import prepare, steps_for_epochs, tokenizer_file
from amptrain.runs import (
    atomic_write_bytes,
    atomic_write_json,
    check_folder,
    clean_temporaries,
    create_run_dir,
    environment,
    final_files,
    write_config,
)
from amptrain.runs.hf_export import is_hf_model
from amptrain.runs.lock import RunInUseError, RunLock
from amptrain.runs.lock import acquire as acquire_run_lock
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
        run = _new_run(cfg, command)
        started = start(run.run_dir, True)
    else:  # started before the run's files are edited: a refusal leaves them as they were
        run = _resumed_run(cfg, resume, command, given or {}, allow_new_scaler, start)
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
            _remove_new_run(run.run_dir, started)
        raise
    finally:
        if run.lock is not None:
            run.lock.release()  # the run's last file is written


def _write_sources(run_dir: Path, cfg: TrainConfig) -> None:
    """`base.json` (where the model came from) and a copy of the tokenizer: the run can move."""
    atomic_write_json(run_dir / BASE_FILE, provenance.record(cfg.model))
    path = tokenizer_file(cfg)
    if path is not None:
        atomic_write_bytes(run_dir / "tokenizer.json", Path(path).read_bytes())
        for name in SETTINGS_FILES:  # its special tokens and chat template, where it has them
            if (Path(path).parent / name).is_file():
                atomic_write_bytes(run_dir / name, (Path(path).parent / name).read_bytes())


class _Opened(NamedTuple):
    """A run ready for `fit`: checked in full, its directory created or reopened."""

    cfg: TrainConfig
    run_dir: Path
    model: nn.Module
    train: data.Blocks
    val: data.Blocks
    precision: Precision
    ckpt: checkpoint.Checkpoint | None = None
    history: Sequence[dict[str, Any]] = ()
    trackers: Sequence[Sink] = ()
    lock: RunLock | None = None  # rank 0's hold on the run directory
    planned: dict[str, Any] | None = None  # the micro-batch measured to fit, before the run


def _lock(run_dir: Path) -> RunLock | None:
    """Rank 0 locks the run directory; a refusal reaches every rank (no rank trains alone)."""
    lock, refusal = None, None
    if distributed.is_main():
        try:
            lock = acquire_run_lock(run_dir)
        except RunInUseError as exc:
            refusal = str(exc)
    refusal = distributed.broadcast(refusal)
    if refusal:
        raise RunInUseError(refusal)
    return lock


def _new_run(cfg: TrainConfig, command: str) -> _Opened:
    """Check everything `fit` will, then create the run directory and its config.json."""
    check_folder(cfg.out)
    model, train, val, precision = prepare(cfg)
    if cfg.epochs is not None:  # the steps of that many passes, recorded as max_steps
        steps = steps_for_epochs(cfg, train, distributed.world()[1])
        log.info("--epochs %g: %d optimizer steps over %d training blocks", cfg.epochs, steps,
                 len(train))  # fmt: skip
        cfg = dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, max_steps=steps))
    opts, prec, train_b, _ = preflight(
        model, train, val, precision=precision, source=cfg.model, **dataclasses.asdict(cfg.fit)
    )  # refused before the run directory exists
    planned = None
    if memory_plan.wanted(opts):  # measured now: a budget nothing fits is refused here too
        opts, planned = memory_plan.plan(model, train_b, prec, opts)
        split = {
            k: getattr(opts, k)
            for k in (
                "batch_size",
                "grad_accum",
                "eval_batches",
                "activation_checkpointing",
                "micro_batch",
            )
        }
        cfg = dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, **split))
    main = distributed.is_main()
    run_dir = create_run_dir(cfg.out, command) if main else None
    run_dir = Path(distributed.broadcast(str(run_dir) if main else None))
    lock = None
    try:
        lock = _lock(run_dir)  # a new name: free, but a resume beside the run must see it taken
        if main:
            write_config(run_dir, command, cfg)
            _write_sources(run_dir, cfg)
    except BaseException:  # a signal or a failed write: nothing of a run that never trained
        if main:
            _remove_new_run(run_dir, [])
        if lock is not None:
            lock.release()
        raise
    return _Opened(cfg, run_dir, model, train, val, precision, lock=lock, planned=planned)


def _remove_new_run(run_dir: Path, trackers: Sequence[Sink]) -> None:
    """Remove a new run's directory that holds no training (its trackers closed first)."""
    for sink in trackers:
        with contextlib.suppress(Exception):
            sink.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def _resumed_run(
    cfg: TrainConfig,
    resume: str,
    command: str,
    given: dict[str, Any],
    allow_new_scaler: bool,
    start: Callable[[Path, bool], list[Sink]],
) -> _Opened:
    """Load and check the checkpoint against everything, and only then edit the run's files."""
    run_dir, ckpt = find_resume(cfg.out, resume, command)
    lock = _lock(run_dir)  # before anything is read for the resume, or edited
    try:
        return _reopen(cfg, run_dir, ckpt, command, given, allow_new_scaler, start, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _reopen(
    cfg: TrainConfig,
    run_dir: Path,
    ckpt: checkpoint.Checkpoint,
    command: str,
    given: dict[str, Any],
    allow_new_scaler: bool,
    start: Callable[[Path, bool], list[Sink]],
    lock: RunLock | None,
) -> _Opened:
    """`_resumed_run` once the run is locked."""
    saved = TrainConfig.from_dict(saved_config(run_dir))
    check_data(saved, ckpt)
    if "model" not in given:  # named by the run's config.json, which may come from elsewhere
        check_trusted(saved.model, run_dir)
    check_config_hash(saved, ckpt)
    cfg = resumed_config(saved, given, ckpt.trainer["step"])
    asked = given.get("precision")  # else config.json's, checked against the checkpoint too
    model, train, val, precision = prepare(
        dataclasses.replace(cfg, precision=asked or cfg.precision), ckpt,
        allow_new_scaler=allow_new_scaler,
        asked_by="--precision" if asked else "the run's config.json")  # fmt: skip
    # Every check of the resume (shapes, scaler, world size...) before any file is touched.
    preflight(model, train, val, precision=precision, source=cfg.model, resume=ckpt,
              allow_new_scaler=allow_new_scaler, **dataclasses.asdict(cfg.fit))  # fmt: skip
    started = start(run_dir, False)  # the trackers too: a refused one changes nothing
    distributed.barrier()  # every rank has read the checkpoint before rank 0 edits the run
    history = []
    if distributed.is_main():
        history = truncate_metrics(run_dir, ckpt.trainer["step"])
        if cfg != saved:  # extended: config.json says what the run now is
            config = {**cfg.to_dict(), "environment": environment()}
            atomic_write_json(run_dir / "config.json", config)
    log.info("resuming %s from %s (step %d)", run_dir, ckpt.path.name, ckpt.trainer["step"])
    return _Opened(cfg, run_dir, model, train, val, precision, ckpt, history, started, lock)


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
