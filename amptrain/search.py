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

    export AMPTRAIN_DB=postgresql://user:password@dbhost/optuna   # pip install psycopg2-binary
    amptrain search --storage env:AMPTRAIN_DB --study-name sweep --trials 200 --workers 2

Each process stops once the study holds `--trials` counted trials, so many machines overshoot
by at most one trial per extra process; heartbeats fail (and so replace) a dead machine's trial.
Passwords in URLs are shown as `***` in every message and file (`redact`). Optuna is imported
inside functions only, so `amptrain --help` stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from amptrain import search_space
from amptrain.callbacks import Callback
from amptrain.config import FitOptions, TrainConfig
from amptrain.errors import ConfigError, NonFiniteError

log = logging.getLogger("amptrain")

OBJECTIVES = {"val_loss": "minimize", "tokens_per_s": "maximize"}
PRUNERS = ("median", "hyperband", "none")
REPORTS = 4  # evaluations per trial reported to the pruner, at 1/4, 2/4, 3/4 and 4/4 of the budget
DEFAULT_BUDGET_STEPS = 32  # the default budget: this many steps' tokens at the base batch size
SKIP_STORM = 0.25  # stop a trial once more than this fraction of its steps were skipped
SCALE_FLOOR = 1.0  # ... or once the fp16 loss scale fell below this (1.0 for other precisions)
INTERRUPTED = "interrupted"


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One trial: its outcome, settings, reason and the training run's figures."""

    number: int
    state: str
    value: float | None
    values: tuple[float, ...] | None
    params: dict[str, Any]
    reason: str | None
    duration_s: float | None
    metrics: dict[str, Any]
    intermediate: dict[int, float]
    baseline: bool
    counted: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain values."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """A finished search. `best_*` is the COMPLETE trial of lowest validation loss."""

    study_name: str
    storage: str | None
    objectives: tuple[str, ...]
    n_trials: int
    best_number: int | None
    best_params: dict[str, Any] | None
    best_value: float | None
    best_values: tuple[float, ...] | None
    best_command: str | None
    baseline_number: int | None
    baseline_value: float | None
    settings: dict[str, Any]
    trials: tuple[TrialRecord, ...] = dataclasses.field(repr=False)
    study: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def all_trials(self) -> list[dict[str, Any]]:
        """The original tier-3 shape: `{number, value, params}` per trial."""
        return [{"number": t.number, "value": t.value, "params": t.params} for t in self.trials]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (without the Optuna study)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "study"}
        out["trials"] = [t.to_dict() for t in self.trials]
        return {**out, "all_trials": self.all_trials}


@dataclasses.dataclass(frozen=True)
class _Job:
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
    factory: Callable[[], Any] | None = None
    train: Any = None
    val: Any = None


def redact(url: str) -> str:
    """`url` with any password shown as `***`: `postgresql://user:***@host/db`.

    The password is everything between the user name's colon and the last `@`, so a password
    with a stray `@` or `/` is hidden whole; `password=`/`pwd=` query values are hidden too.
    File paths come back unchanged.
    """
    text = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*:).*@([^@]*)$", r"\1***@\2", str(url))
    return re.sub(r"(?i)([?&](?:password|passwd|pwd)=)[^&]*", r"\1***", text)


def _scrub(text: str, url: str) -> str:
    """`text` with every secret that `redact` hides in `url` replaced by `***`."""
    from urllib.parse import unquote

    found = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^:@/]*:(.*)@[^@]*$", url)
    secrets = [found.group(1)] if found else []
    secrets += re.findall(r"(?i)[?&](?:password|passwd|pwd)=([^&]*)", url)
    for secret in filter(None, secrets):
        text = text.replace(secret, "***").replace(unquote(secret), "***")
    return text


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
) -> SearchResult:
    """`search` on a `TrainConfig`: every trial runs `train.prepare` on its own config copy.

    The arguments are those of `search`; `cfg` gives the model, the data and the base settings
    (its seed seeds the sampler). `best_command` is then the `amptrain train` command line that
    reproduces the best trial.
    """
    from amptrain.train import prepare

    model, train, val, precision = prepare(cfg)  # refuses bad settings before any trial runs
    del model
    job = _make_job(
        cfg, precision.device, space, n_trials, steps, tokens, objectives, pruner, cfg.fit.seed,
        storage, study_name, workers, (Exception,), len(train), len(val),
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
) -> _Job:
    """Check every search setting and the space, before any trial runs."""
    from amptrain.bench import default_precisions

    given = {"n_trials": n_trials, "workers": workers, "steps": steps, "tokens": tokens}
    for label, value in given.items():
        if (value is not None or label in ("n_trials", "workers")) and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"{label}={value!r} is invalid: it must be an integer >= 1")
    if steps is not None and tokens is not None:
        raise ConfigError("give the budget as steps or as tokens, not both")
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
    return _Job(
        base, dims, str(device), n_trials, steps, tokens, base.context - 1,
        search_space.eval_blocks(base, sizes, n_val), objectives, pruner, seed, storage,
        study_name, tuple(catch), **source,
    )  # fmt: skip


def _execute(job: _Job, workers: int, baseline: bool, progress: bool) -> SearchResult:
    from amptrain.search_plot import SearchProgress

    study = _open_study(job, worker=0)
    _fail_orphans(study)
    if baseline and not study.trials:
        _enqueue_baseline(study, job)
    remaining = job.n_trials - _count(study)
    log.info("study %r in %s: %d of %d trials to run", job.study_name,
             redact(job.storage or "memory"), max(remaining, 0), job.n_trials)  # fmt: skip
    bar = SearchProgress(job.n_trials, enabled=progress)
    tick = lambda *_: bar.update(_count(study), _best_value(study))  # noqa: E731
    try:
        if remaining > 0 and workers == 1:
            _optimize(study, job, remaining, [tick])
        elif remaining > 0:
            _spawn(job, remaining, workers, tick)
    finally:
        bar.close()
    short = job.n_trials - _count(study)
    if short > 0:
        log.warning("%d trial(s) short of %d; run the search again to finish them", short,
                    job.n_trials)  # fmt: skip
    return _result(study, job)


def _storage(spec: str | None) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if spec is None:
        return optuna.storages.InMemoryStorage()
    if "://" not in spec:
        Path(spec).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(spec))
    try:  # a heartbeat lets the study fail (and so replace) the trial of a machine that died
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(spec, heartbeat_interval=60, grace_period=180)
    except Exception as exc:  # noqa: BLE001 - the driver's message may quote the URL
        raise ConfigError(f"cannot open the study storage {redact(spec)}: "
                          f"{_scrub(str(exc), spec)}") from None  # fmt: skip


def _open_study(job: _Job, worker: int) -> Any:
    import optuna

    directions = [OBJECTIVES[o] for o in job.objectives]
    study = optuna.create_study(storage=_storage(job.storage), study_name=job.study_name,
                                directions=directions, load_if_exists=True,
                                pruner=_pruner(job))  # fmt: skip
    settings = _settings(job)
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
    elif saved != settings:
        changed = sorted(k for k in settings if settings[k] != saved.get(k))
        raise ConfigError(
            f"study {job.study_name!r} in {redact(job.storage or 'memory')} was run with other "
            f"{', '.join(changed)}; resume it with the same settings, or use a new study name"
        )
    # Seeded by position as well, so a resumed study or a second worker does not repeat the
    # random start-up samples of the first.
    study.sampler = optuna.samplers.TPESampler(
        seed=job.seed + 1000 * len(study.trials) + worker,
        n_startup_trials=max(3, min(10, job.n_trials // 3)),
    )
    return study


def _pruner(job: _Job) -> Any:
    import optuna

    if not isinstance(job.pruner, str):
        return job.pruner
    if job.pruner == "none" or len(job.objectives) > 1:  # Optuna prunes single objectives only
        return optuna.pruners.NopPruner()
    if job.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=REPORTS)
    # Not before half the budget: early losses say more about warm-up than about the settings.
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, job.n_trials // 4)),
                                       n_warmup_steps=REPORTS // 2)  # fmt: skip


def _settings(job: _Job) -> dict[str, Any]:
    """What makes trials comparable; a resumed study must have the same."""
    base = {k: v for k, v in job.base.to_dict().items() if k not in ("out", "device")}
    settings = {
        "base": base, "space": {n: dataclasses.asdict(d) for n, d in job.dims.items()},
        "budget_steps": job.budget_steps, "budget_tokens": job.budget_tokens,
        "eval_blocks": job.eval_blocks, "objectives": list(job.objectives),
    }  # fmt: skip
    return json.loads(json.dumps(settings, default=str))


def _enqueue_baseline(study: Any, job: _Job) -> None:
    from amptrain.precision import resolve

    names = [n for n, d in job.dims.items() if d.searched]
    params = search_space.base_values(job.base, names)
    if "precision" in params:
        params["precision"] = resolve(params["precision"], job.device).name
    outside = [n for n in names if not job.dims[n].contains(params[n])]
    if outside:
        log.info("no baseline trial: the base value of %s is outside the space", ", ".join(outside))
        return
    study.enqueue_trial(params, user_attrs={"baseline": True})


def _fail_orphans(study: Any) -> None:
    """Fail (with reason `interrupted`) RUNNING trials whose worker on this host is gone."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get("worker", ""))
        where, _, pid = owner.rpartition(":")
        if where == host and pid.isdigit() and not _alive(int(pid)):
            reason = f"{INTERRUPTED}: its worker {owner} ended during the trial"
            study._storage.set_trial_user_attr(trial._trial_id, "reason", reason)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _counted(trial: Any) -> bool:
    """Trials with an outcome count towards `n_trials`; interrupted ones are replaced."""
    state = trial.state.name
    if state == "FAIL":
        reason = trial.user_attrs.get("reason")
        return reason is not None and not str(reason).startswith(INTERRUPTED)
    return state in ("COMPLETE", "PRUNED")


def _count(study: Any) -> int:
    return sum(_counted(t) for t in study.get_trials(deepcopy=False))


def _best(study: Any) -> Any:
    """The COMPLETE trial of lowest validation loss (on the Pareto front when multi-objective)."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return min(done, key=lambda t: t.values[0]) if done else None


def _best_value(study: Any) -> float | None:
    best = _best(study)
    return None if best is None else best.values[0]


def _optimize(study: Any, job: _Job, n: int, callbacks: Sequence[Callable]) -> None:
    def stop_when_done(study: Any, trial: Any) -> None:
        if _count(study) >= job.n_trials:  # other processes may have finished the study
            study.stop()

    study.optimize(lambda trial: _objective(trial, job), n_trials=n, catch=job.catch,
                   callbacks=[stop_when_done, *callbacks])  # fmt: skip


def _spawn(job: _Job, n: int, workers: int, tick: Callable[[], None]) -> None:
    """Run `n` trials in `workers` fresh processes on the study, while this one shows progress."""
    import multiprocessing

    import optuna
    import torch

    # spawn, not fork: a forked child would inherit torch's thread pools and the study's locks.
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // workers)
    shares = [n // workers + (i < n % workers) for i in range(workers)]
    verbosity = optuna.logging.get_verbosity()
    procs = [ctx.Process(target=_worker, args=(job, share, i + 1, threads, verbosity))
             for i, share in enumerate(shares) if share]  # fmt: skip
    for proc in procs:
        proc.start()
    try:
        while any(p.is_alive() for p in procs):
            tick()
            time.sleep(0.5)
    except BaseException:
        for proc in procs:  # their trials stay RUNNING; a resumed study fails and replaces them
            proc.terminate()
        raise
    finally:
        for proc in procs:
            proc.join()
    tick()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        log.warning("%d of %d worker processes exited with an error (codes %s)", len(failed),
                    len(procs), failed)  # fmt: skip


def _worker(job: _Job, n: int, index: int, threads: int, verbosity: int) -> None:
    import optuna
    import torch

    torch.set_num_threads(threads)  # the workers share the cores
    optuna.logging.set_verbosity(verbosity)
    with contextlib.suppress(KeyboardInterrupt):  # the trial is already marked interrupted
        _optimize(_open_study(job, worker=index), job, n, [])


def _objective(trial: Any, job: _Job) -> float | tuple[float, ...]:
    """Train one sampled configuration; return its objective values, or prune or fail it."""
    import optuna

    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    watch = _Watch(trial, prune=len(job.objectives) == 1)
    values: tuple[float, ...] | None = None
    try:
        result = _train(trial, job, watch)
    except NonFiniteError as exc:
        watch.reason = f"unstable: {exc}"
    except KeyboardInterrupt:
        trial.set_user_attr("reason", f"{INTERRUPTED}: KeyboardInterrupt")
        raise
    except Exception as exc:
        trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}"[:500])
        raise
    else:
        trial.set_user_attr("metrics", _metrics(result))
        figures = {"val_loss": result.final_val_loss, "tokens_per_s": result.tokens_per_s}
        values = tuple(math.nan if figures[o] is None else figures[o] for o in job.objectives)
    if values is not None and not all(math.isfinite(v) for v in values):
        why = f"non-finite objective {values}" + (f" ({watch.reason})" if watch.reason else "")
        trial.set_user_attr("reason", why)
        values = tuple(math.nan for _ in values)  # Optuna stores NaN (not inf) as FAIL
    elif watch.reason:
        trial.set_user_attr("reason", watch.reason)
        raise optuna.TrialPruned(watch.reason)
    return values[0] if len(values) == 1 else values


class _Watch(Callback):
    """Reports the validation loss to the trial for pruning; stops an unstable run early."""

    def __init__(self, trial: Any, prune: bool) -> None:
        self.trial, self.prune, self.steps = trial, prune, 1
        self.reason: str | None = None

    def on_step_end(self, state: Any, metrics: Any) -> None:
        """Stop on a storm of skipped steps or a collapsed loss scale."""
        if self.reason is None and state.skipped_steps > SKIP_STORM * self.steps:
            self.reason = (f"unstable: {state.skipped_steps} of {state.step} steps skipped "
                           "(inf/NaN gradients)")  # fmt: skip
        elif self.reason is None and metrics.get("amp/loss_scale", SCALE_FLOOR) < SCALE_FLOOR:
            self.reason = f"unstable: the loss scale collapsed to {metrics['amp/loss_scale']:g}"
        state.should_stop = state.should_stop or self.reason is not None

    def on_eval_end(self, state: Any, metrics: Any) -> None:
        """Report at a fraction of the budget (1..REPORTS), so trials compare at equal shares."""
        if state.step == 0 or self.reason is not None or not self.prune:
            return
        self.trial.report(metrics["val/loss"], max(1, round(REPORTS * state.step / self.steps)))
        if self.trial.should_prune():
            loss = metrics["val/loss"]
            self.reason = f"pruned at step {state.step}/{self.steps}: val loss {loss:.4f}"
            state.should_stop = True


def _train(trial: Any, job: _Job, watch: _Watch) -> Any:
    """Sample a config, build a fresh model and data for it, train with exactly its options."""
    from amptrain.data import Blocks
    from amptrain.loop import fit

    cfg = search_space.apply(job.base, search_space.sample(trial, job.dims))
    cfg = search_space.budgeted(cfg, job.budget_steps, job.budget_tokens, job.block_targets,
                                job.eval_blocks, REPORTS)  # fmt: skip
    trial.set_user_attr("config", cfg.to_dict())
    watch.steps = cfg.fit.max_steps
    if job.factory is None:
        from amptrain.train import prepare

        model, train, val, precision = prepare(cfg)
    else:
        model, train, val, precision = job.factory(), job.train, job.val, cfg.precision
    val = Blocks(val.inputs[: job.eval_blocks], val.labels[: job.eval_blocks], val.name)
    return fit(model, train, val, precision=precision, callbacks=[watch], source=cfg.model,
               **dataclasses.asdict(cfg.fit))  # fmt: skip


def _metrics(result: Any) -> dict[str, Any]:
    keep = ("precision", "steps", "skipped_steps", "tokens", "tokens_per_s", "train_time_s",
            "final_train_loss", "final_val_loss", "final_val_accuracy", "loss_scale",
            "peak_mem_mb")  # fmt: skip
    figures = {k: v for k, v in result.to_dict().items() if k in keep}
    # The first step's learning rate shows that lr, warm-up and budget reached the scheduler.
    lrs = [r["train/lr"] for r in result.history if "train/lr" in r]
    return {**figures, "first_lr": lrs[0] if lrs else None}


def _result(study: Any, job: _Job) -> SearchResult:
    trials = tuple(_record(t) for t in study.get_trials(deepcopy=False))
    best = _best(study)
    baseline = next((t for t in trials if t.baseline), None)
    command = None
    if best is not None and job.factory is None:
        command = search_space.train_command(TrainConfig.from_dict(best.user_attrs["config"]))
    return SearchResult(
        study_name=job.study_name, storage=None if job.storage is None else redact(job.storage),
        objectives=job.objectives, n_trials=sum(t.counted for t in trials),
        best_number=None if best is None else best.number,
        best_params=None if best is None else dict(best.params),
        best_value=None if best is None else best.values[0],
        best_values=None if best is None else tuple(best.values), best_command=command,
        baseline_number=None if baseline is None else baseline.number,
        baseline_value=None if baseline is None else baseline.value,
        settings=_settings(job), trials=trials, study=study,
    )  # fmt: skip


def _record(t: Any) -> TrialRecord:
    duration = None if t.duration is None else t.duration.total_seconds()
    return TrialRecord(
        number=t.number, state=t.state.name, value=None if t.values is None else t.values[0],
        values=None if t.values is None else tuple(t.values), params=dict(t.params),
        reason=t.user_attrs.get("reason"), duration_s=duration,
        metrics=dict(t.user_attrs.get("metrics", {})),
        intermediate=dict(t.intermediate_values), baseline=bool(t.user_attrs.get("baseline")),
        counted=_counted(t),
    )  # fmt: skip


# ---- the `amptrain search` command (wired up by amptrain.cli) ----

SKIP_TRAIN_FLAGS = ("--max-steps", "--eval-every", "--log-every", "--checkpoint-every",
                    "--keep-last")  # fmt: skip


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `amptrain search` besides the model, data and training flags of `train`."""
    add = parser.add_argument
    add("--trials", type=int, default=20, help="trials to finish (pruned and failed count)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=int, help="optimizer steps per trial")
    budget.add_argument(
        "--budget-tokens",
        type=int,
        help="training tokens per trial (default: "
        f"{DEFAULT_BUDGET_STEPS} steps' worth at --batch-size x --grad-accum)",
    )
    add(
        "--space",
        type=Path,
        help="JSON/TOML search space keyed by train flag names (default: "
        "lr, batch-size, warmup, weight-decay, grad-accum, precision; flags given are fixed)",
    )
    add("--objectives", default="val_loss", help="val_loss, or val_loss,tokens_per_s")
    add("--pruner", choices=PRUNERS, default="median", help="pruner of unpromising trials")
    add("--study-name", help="study to create or resume; its run directory is OUT/search-NAME")
    add(
        "--storage",
        help="journal file (default OUT/search-NAME/journal.log), an RDB URL "
        "(postgresql://user:pass@host/db) for workers on many machines, or env:VAR",
    )
    add("--workers", type=int, default=1, help="processes working on the study on this machine")
    add("--no-baseline", action="store_true", help="do not run the base settings as trial 0")


def cli_main(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """Run `amptrain search`: the table on stdout, the run directory's files, exit code 0."""
    from amptrain.search_plot import run_cli

    return run_cli(args, cfg)
