"""`amptrain search`: precision-aware hyperparameter search on Optuna, from one process to many.

Every trial puts its sampled settings (`search_space`) into a copy of the training config,
builds a fresh model and trains it with `fit` under the same budget (steps, or tokens turned
into steps). The objective is the final validation loss on the same validation blocks in every
trial (optionally also tokens/s, for a Pareto front), reported to the pruner at four
evaluations. A storm of skipped steps (inf/NaN gradients) or a collapsed fp16 loss scale stops
the trial as PRUNED; a non-finite objective is FAIL; the reason is stored on the trial; an
exception in one trial fails that trial only.

`n_trials` counts trials with an outcome (COMPLETE, PRUNED, FAIL). A trial cut off by Ctrl-C or
a killed worker is FAIL with reason `interrupted...`, is not counted, and is replaced when the
study resumes. Storage: in memory; a journal file (the CLI's default; one machine, `--workers N`
processes); or an RDB URL for many machines. For those, start the same command everywhere::

    export AMPTRAIN_DB=postgresql://user:password@dbhost/optuna   # pip install amptrain[search]
    amptrain search --storage env:AMPTRAIN_DB --study-name sweep --trials 200 --workers 2

Each process stops once the study holds `--trials` counted trials, so many machines overshoot
by at most one trial per extra process. On an RDB storage every worker sends heartbeats; a
trial whose worker fell silent is failed (not counted) and its parameters run again once.
Passwords in URLs are shown as `***` in every message and file (`redact`). Optuna is imported
inside functions only, so `amptrain --help` stays light.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from amptrain.config import SEARCH_BUDGET_STEPS as DEFAULT_BUDGET_STEPS
from amptrain.config import FitOptions, TrainConfig
from amptrain.errors import ConfigError, EnvironmentFailure
from amptrain.search import space as search_space
from amptrain.search.records import SearchResult, TrialRecord, result_of
from amptrain.search.setup import command_space, open_run
from amptrain.search.study import (
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    OBJECTIVES,
    PRUNERS,
    best_trial_value,
    count_trials,
    enqueue_baseline,
    fail_orphans,
    is_url,
    open_study,
    optimize_trials,
    redact,
    storage_failures,
)
from amptrain.search.workers import spawn_workers

__all__ = [
    "OBJECTIVES", "PRUNERS", "SearchResult", "TrialRecord", "command_space", "open_run", "redact",
    "run_search", "search",
]  # fmt: skip

log = logging.getLogger("amptrain")


@dataclasses.dataclass(frozen=True)
class SearchJob:
    """Everything a worker needs to run trials; picklable for spawned processes."""

    base: TrainConfig
    dims: dict[str, search_space.Dimension]
    device: str
    n_trials: int
    budget_steps: int | None
    budget_tokens: int | None
    block_targets: int
    eval_blocks: int
    objectives: tuple[str, ...]
    pruner: Any
    seed: int
    storage: str | None
    study_name: str
    catch: tuple[type[BaseException], ...]
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    grace_period: int = GRACE_PERIOD
    factory: Callable[[], Any] | None = None
    train: Any = None
    val: Any = None


def search(
    model_factory: Callable[[], Any],
    train: object,
    val: object,
    space: dict[str, Any] | str | Path | None = None,
    n_trials: int = 20,
    *,
    steps: int | None = None,
    tokens: int | None = None,
    objectives: Sequence[str] = ("val_loss",),
    pruner: str | Any = "median",
    seed: int = 0,
    storage: str | Path | None = None,
    study_name: str = "search",
    workers: int = 1,
    baseline: bool = True,
    precision: str = "auto",
    catch: tuple[type[BaseException], ...] = (Exception,),
    progress: bool = False,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    **options: Any,
) -> SearchResult:
    """Search training settings and precision for the models `model_factory` builds.

    Args:
        model_factory: Builds a fresh model (on its device) for every trial; with
            `workers > 1` it must be picklable (a module-level function or a partial of one).
        train: Training data (`Blocks`, a 2-D tensor, token lists...).
        val: Validation data; the objective is scored on the same blocks in every trial.
        space: A dict, or a JSON/TOML file, of `train` flag names to choices, ranges or fixed
            values (see `search_space`); None: lr, batch size, warmup, weight decay, gradient
            accumulation, and every precision the model's device serves.
        n_trials: Trials to finish in the study, counting those already there.
        steps: Optimizer steps per trial.
        tokens: Training tokens per trial instead (steps = tokens / tokens per step). Neither:
            `DEFAULT_BUDGET_STEPS` steps' worth of tokens at the base batch size.
        objectives: `("val_loss",)` or `("val_loss", "tokens_per_s")`.
        pruner: `median`, `hyperband`, `none`, or an Optuna pruner.
        seed: Seed of the sampler, the initial weights (CLI) and the batch order.
        storage: None (in memory), a journal file path, or an RDB URL.
        study_name: Name of the study in `storage`; an existing study is resumed.
        workers: Processes working on the study (needs a journal file or RDB storage).
        baseline: Run the base settings as the first trial of a new study.
        precision: The base precision (for the baseline, and when not searched).
        catch: Exceptions that fail one trial without stopping the study.
        progress: Show a progress bar on stderr.
        heartbeat_interval: RDB storage: seconds between a worker's signs of life.
        grace_period: RDB storage: seconds of silence after which a RUNNING trial counts as
            abandoned (its worker died); the next trial to start fails it (not counted) and
            runs its parameters again once. Must exceed `heartbeat_interval`.
        **options: Base `FitOptions` (`lr`, `batch_size`, `eval_batches`, `max_nonfinite`...).

    Returns:
        A `SearchResult` with every trial and the best one.

    Raises:
        ConfigError, PrecisionError: For a bad space, budget or option, before any trial runs.

    Example:
        >>> result = search(make_model, train, val, {"lr": {"low": 1e-4, "high": 1e-2,
        ...                 "log": True}, "precision": ["fp32", "bf16"]}, n_trials=12,
        ...                 tokens=200_000)  # doctest: +SKIP
        >>> result.best_params, result.best_value  # doctest: +SKIP
    """
    from amptrain.data import as_blocks

    train_b, val_b = as_blocks(train, name="training data"), as_blocks(val, name="validation data")
    device = next(model_factory().parameters()).device
    name = getattr(model_factory, "__name__", type(model_factory).__name__)
    fit_options = FitOptions(seed=seed, **options)
    base = TrainConfig(model=f"python:{name}", precision=precision, context=train_b.context,
                       fit=fit_options)  # fmt: skip
    job = _make_job(
        base, device, space, n_trials, steps, tokens, objectives, pruner, seed,
        None if storage is None else str(storage), study_name, workers, catch,
        len(train_b), len(val_b), factory=model_factory, train=train_b, val=val_b,
        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
    )  # fmt: skip
    return _execute(job, workers, baseline, progress)


def run_search(
    cfg: TrainConfig,
    *,
    space: dict[str, Any] | str | Path | None = None,
    n_trials: int = 20,
    steps: int | None = None,
    tokens: int | None = None,
    objectives: Sequence[str] = ("val_loss",),
    pruner: str | Any = "median",
    study_name: str = "search",
    storage: str | None = None,
    workers: int = 1,
    baseline: bool = True,
    progress: bool = False,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
) -> SearchResult:
    """`search` on a `TrainConfig`: every trial runs `train.prepare` on its own config copy.

    The arguments are those of `search`; `cfg` gives the model, the data and the base settings
    (its seed seeds the sampler). `best_command` is then the `amptrain train` command line that
    reproduces the best trial.
    """
    from amptrain.run_setup import prepare

    model, train, val, precision = prepare(cfg)  # refuses bad settings before any trial runs
    del model
    job = _make_job(
        cfg, precision.device, space, n_trials, steps, tokens, objectives, pruner, cfg.fit.seed,
        storage, study_name, workers, (Exception,), len(train), len(val),
        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
    )  # fmt: skip
    return _execute(job, workers, baseline, progress)


def _make_job(
    base: TrainConfig,
    device: Any,
    space: dict[str, Any] | str | Path | None,
    n_trials: int,
    steps: int | None,
    tokens: int | None,
    objectives: Sequence[str],
    pruner: str | Any,
    seed: int,
    storage: str | None,
    study_name: str,
    workers: int,
    catch: tuple[type[BaseException], ...],
    n_train: int,
    n_val: int,
    **source: Any,
) -> SearchJob:
    """Check every search setting and the space, before any trial runs."""
    from amptrain.precision import default_precisions

    beat, grace = source["heartbeat_interval"], source["grace_period"]
    given = {"n_trials": n_trials, "workers": workers, "steps": steps, "tokens": tokens,
             "heartbeat_interval": beat, "grace_period": grace}  # fmt: skip
    for label, value in given.items():
        if (value is not None or label not in ("steps", "tokens")) and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"{label}={value!r} is invalid: it must be an integer >= 1")
    if steps is not None and tokens is not None:
        raise ConfigError("give the budget as steps or as tokens, not both")
    if grace <= beat:  # else a live but busy worker's trial could be failed under it
        raise ConfigError(f"grace_period={grace} must be longer than heartbeat_interval={beat}")
    objectives = tuple(objectives)
    if not objectives or objectives[0] != "val_loss" or not set(objectives) <= set(OBJECTIVES):
        raise ConfigError(f"objectives={objectives!r}: use val_loss or val_loss,tokens_per_s")
    if isinstance(pruner, str) and pruner not in PRUNERS:
        raise ConfigError(f"pruner={pruner!r} is not one of {', '.join(PRUNERS)}")
    if workers > 1 and storage is None:
        raise ConfigError(f"workers={workers} need a shared storage: a journal file or an RDB URL")
    if space is None:
        space = search_space.default_space(default_precisions(device))
    dims = search_space.parse_space(search_space.load_space(space), base, device)
    sizes = search_space.batch_sizes(base, dims)
    if max(sizes) > n_train:
        raise ConfigError(f"batch size {max(sizes)} is larger than the {n_train} training blocks")
    if steps is None and tokens is None:
        fit = base.fit
        tokens = DEFAULT_BUDGET_STEPS * fit.batch_size * fit.grad_accum * (base.context - 1)
    return SearchJob(
        base, dims, str(device), n_trials, steps, tokens, base.context - 1,
        search_space.eval_blocks(base, sizes, n_val), objectives, pruner, seed, storage,
        study_name, tuple(catch), **source,
    )  # fmt: skip


def _execute(job: SearchJob, workers: int, baseline: bool, progress: bool) -> SearchResult:
    from amptrain.search.report import SearchProgress

    study = open_study(job, worker=0)
    if not is_url(job.storage):  # an RDB storage's heartbeat finds dead workers on any machine
        fail_orphans(study)
    if baseline and not study.trials:
        enqueue_baseline(study, job)
    remaining = job.n_trials - count_trials(study)
    log.info("study %r in %s: %d of %d trials to run", job.study_name,
             redact(job.storage or "memory"), max(remaining, 0), job.n_trials)  # fmt: skip
    bar = SearchProgress(job.n_trials, enabled=progress)
    tick = lambda *_: bar.update(count_trials(study), best_trial_value(study))  # noqa: E731
    failed = None
    try:
        with storage_failures(job):  # the progress bar reads the study too
            if remaining > 0 and workers == 1:
                optimize_trials(study, job, remaining, [tick])
            elif remaining > 0:
                failed = spawn_workers(job, remaining, workers, tick)
            short = job.n_trials - count_trials(study)
    finally:
        bar.close()
    if failed and short > 0:
        raise EnvironmentFailure(f"{failed}; {short} of {job.n_trials} trials are not done: run "
                                 "the same command again to finish them (the study keeps every "
                                 "finished trial)")  # fmt: skip
    if failed:
        log.warning("%s; the other workers completed the study", failed)
    elif short > 0:
        log.warning("%d trial(s) short of %d; run the search again to finish them", short,
                    job.n_trials)  # fmt: skip
    return result_of(study, job)
