"""Opening a `train` run, new or resumed, checked in full before any file is written.

A new run is checked before its directory exists; a resumed one against its checkpoint before
any of its files is edited; either is locked (`runs.lock`) while it trains.
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

from amptrain import checkpoint, data, distributed, memory_plan
from amptrain.config import TrainConfig
from amptrain.data.tokenizers import SETTINGS_FILES
from amptrain.metrics.sinks import Sink
from amptrain.models import check_trusted, provenance
from amptrain.models.provenance import BASE_FILE
from amptrain.precision import Precision
from amptrain.preflight import preflight
from amptrain.resume_config import resumed_config
from amptrain.resuming import (
    check_config_hash,
    check_data,
    find_resume,
    saved_config,
    truncate_metrics,
)
from amptrain.run_setup import prepare, steps_for_epochs, tokenizer_file
from amptrain.runs import (
    atomic_write_bytes,
    atomic_write_json,
    check_folder,
    create_run_dir,
    environment,
    write_config,
)
from amptrain.runs.lock import RunInUseError, RunLock
from amptrain.runs.lock import acquire as acquire_run_lock

log = logging.getLogger("amptrain")


def _write_sources(run_dir: Path, cfg: TrainConfig) -> None:
    """`base.json` (where the model came from) and a copy of the tokenizer: the run can move."""
    atomic_write_json(run_dir / BASE_FILE, provenance.record(cfg.model))
    path = tokenizer_file(cfg)
    if path is not None:
        atomic_write_bytes(run_dir / "tokenizer.json", Path(path).read_bytes())
        for name in SETTINGS_FILES:  # its special tokens and chat template, where it has them
            if (Path(path).parent / name).is_file():
                atomic_write_bytes(run_dir / name, (Path(path).parent / name).read_bytes())


class Opened(NamedTuple):
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


def open_new(cfg: TrainConfig, command: str) -> Opened:
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
            remove_new_run(run_dir, [])
        if lock is not None:
            lock.release()
        raise
    return Opened(cfg, run_dir, model, train, val, precision, lock=lock, planned=planned)


def remove_new_run(run_dir: Path, trackers: Sequence[Sink]) -> None:
    """Remove a new run's directory that holds no training (its trackers closed first)."""
    for sink in trackers:
        with contextlib.suppress(Exception):
            sink.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def open_resumed(
    cfg: TrainConfig,
    resume: str,
    command: str,
    given: dict[str, Any],
    allow_new_scaler: bool,
    start: Callable[[Path, bool], list[Sink]],
) -> Opened:
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
) -> Opened:
    """`open_resumed` once the run is locked."""
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
    return Opened(cfg, run_dir, model, train, val, precision, ckpt, history, started, lock)
