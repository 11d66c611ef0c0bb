"""The search's study: storage, the pruner, counting finished trials, and worker processes.

`n_trials` counts trials with an outcome (COMPLETE, PRUNED, FAIL); a trial left RUNNING by a
killed worker is failed as interrupted and replaced: on a file storage when its `host:pid` is
gone, on an RDB storage when its heartbeat stopped (and then retried with the same parameters).
Local workers each optimise their exact share of the remaining trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from amptrain import config
from amptrain.config import SEARCH_PRUNERS
from amptrain.errors import ConfigError, EnvironmentFailure
from amptrain.runs import private_file
from amptrain.search import space as search_space
from amptrain.search.journal import open_journal
from amptrain.search.trial import INTERRUPTED, REPORTS, run_trial
from amptrain.secrets import quoted_password, redact, scrub, url_secrets

if TYPE_CHECKING:
    from amptrain.search import SearchJob

OBJECTIVES = {"val_loss": "minimize", "tokens_per_s": "maximize"}
PRUNERS = SEARCH_PRUNERS
# RDB storages only: a worker proves it is alive every HEARTBEAT_INTERVAL seconds; a RUNNING
# trial silent for GRACE_PERIOD seconds is failed by the next worker to start a trial, and run
# again (once) with the same parameters.
HEARTBEAT_INTERVAL = config.HEARTBEAT_INTERVAL
GRACE_PERIOD = config.GRACE_PERIOD
MAX_RETRY = 1
CONNECT_TIMEOUT = 10
OPEN_ATTEMPTS = 5
STALE = f"{INTERRUPTED}: its worker stopped sending heartbeats"

log = logging.getLogger("amptrain")


def is_url(spec: str | None) -> bool:
    """True for an RDB URL (`postgresql://...`), False for a journal file or None (memory)."""
    return spec is not None and "://" in spec


def _storage(
    spec: str | None, heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int = GRACE_PERIOD
) -> Any:
    import optuna

    if spec is None:
        return optuna.storages.InMemoryStorage()
    if not is_url(spec):
        return open_journal(spec)
    sqlite_path = spec.partition("sqlite:///")[2]
    if spec.startswith("sqlite:///") and sqlite_path and sqlite_path != ":memory:":
        private_file(sqlite_path)  # an empty file is a new database to SQLite
    attempt = 1
    while True:
        try:
            return _rdb_storage(spec, heartbeat_interval, grace_period)
        except Exception as exc:  # noqa: BLE001 - the driver's message may quote the URL
            if attempt < OPEN_ATTEMPTS and _creation_race(exc):
                attempt += 1
                time.sleep(random.uniform(0.2, 1.0))  # another worker is creating the tables
                continue
            raise ConfigError(_storage_error(spec, exc)) from None


def _storage_error(spec: str, exc: Exception) -> str:
    """One line naming the storage (password as `***`) and what went wrong."""
    from sqlalchemy.exc import ArgumentError

    # The driver's message spans lines and ends with a link to SQLAlchemy's pages.
    text = re.sub(r"\(Background on this error at:[^)]*\)", "", str(exc))
    text = " ".join(scrub(text, url_secrets(spec)).split())
    if isinstance(exc, (ArgumentError, ValueError)):  # the URL did not parse
        return (f"{redact(spec)} is not a valid database URL ({text}); the form is "
                "postgresql://user:password@host:5432/database")  # fmt: skip
    return f"cannot open the study storage {redact(spec)}: {text}"


def _rdb_storage(spec: str, heartbeat_interval: int, grace_period: int) -> Any:
    import optuna

    # A heartbeat lets the study fail (and retry once) the trial of a machine that died.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        return optuna.storages.RDBStorage(quoted_password(spec), engine_kwargs=_engine_kwargs(spec),
                                          heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period,
                                          heartbeat_stale_trial_callback=retry)  # fmt: skip


def _creation_race(exc: Exception) -> bool:
    """True when workers starting together on an empty database both created the tables."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    return isinstance(exc, IntegrityError) or (
        isinstance(exc, ProgrammingError) and "already exists" in str(exc)
    )


def _engine_kwargs(url: str) -> dict[str, Any]:
    """PostgreSQL: give up on an unreachable host after CONNECT_TIMEOUT s instead of hanging."""
    if url.startswith("postgresql"):  # a libpq option: psycopg and psycopg2 both take it
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
    return {}


def open_study(job: SearchJob, worker: int) -> Any:
    """Create or join the job's study, refusing one run with other settings; seed its sampler.

    Raises:
        ConfigError: If the stored study was run with other settings, naming them.
    """
    import optuna

    directions = [OBJECTIVES[o] for o in job.objectives]
    storage = _storage(job.storage, job.heartbeat_interval, job.grace_period)
    study = optuna.create_study(storage=storage, study_name=job.study_name,
                                directions=directions, load_if_exists=True,
                                pruner=_pruner(job))  # fmt: skip
    settings = study_settings(job)
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


def _pruner(job: SearchJob) -> Any:
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


def study_settings(job: SearchJob) -> dict[str, Any]:
    """What makes trials comparable; a resumed study must have the same."""
    base = {k: v for k, v in job.base.to_dict().items() if k not in ("out", "device")}
    settings = {
        "base": base, "space": {n: dataclasses.asdict(d) for n, d in job.dims.items()},
        "budget_steps": job.budget_steps, "budget_tokens": job.budget_tokens,
        "eval_blocks": job.eval_blocks, "objectives": list(job.objectives),
    }  # fmt: skip
    return json.loads(json.dumps(settings, default=str))


def enqueue_baseline(study: Any, job: SearchJob) -> None:
    """Queue the base configuration as the first trial, when it lies inside the space."""
    from amptrain.precision import resolve

    names = [n for n, d in job.dims.items() if d.searched]
    params = search_space.base_values(job.base, names)
    if "precision" in params:
        params["precision"] = resolve(params["precision"], job.device).name
    outside = [n for n in names if not job.dims[n].contains(params[n])]
    if outside:
        log.info("no baseline trial: the base value of %s is outside the space", ", ".join(outside))
        return
    # skip_if_exists: two machines starting the study at once enqueue it once (or nearly).
    study.enqueue_trial(params, user_attrs={"baseline": True}, skip_if_exists=True)


def fail_orphans(study: Any) -> None:
    """Fail (with reason `interrupted`) RUNNING trials whose worker on this host is gone.

    For file and memory storages; an RDB storage's heartbeat does this for every machine, and
    also retries the trial.
    """
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


def counted(trial: Any) -> bool:
    """Whether `trial` counts towards `n_trials`: whether it has an outcome.

    Complete, pruned and failed-with-a-reason trials count; interrupted ones, and those the
    heartbeat failed, do not: they are replaced.
    """
    state = trial.state.name
    if state == "FAIL":  # no reason: failed by the heartbeat, outside any objective
        reason = trial.user_attrs.get("reason")
        return reason is not None and not str(reason).startswith(INTERRUPTED)
    return state in ("COMPLETE", "PRUNED")


def count_trials(study: Any) -> int:
    """The study's trials that count towards `n_trials` (see `counted`)."""
    return sum(counted(t) for t in study.get_trials(deepcopy=False))


def best_trial(study: Any) -> Any:
    """The COMPLETE trial of lowest validation loss.

    With two objectives, the one of the Pareto front (`pareto_front`) with the lowest validation
    loss, the faster of two that tie.
    """
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(study.directions) > 1:
        done = list(study.best_trials)
        return min(done, key=lambda t: (t.values[0], -t.values[1])) if done else None
    return min(done, key=lambda t: t.values[0]) if done else None


def pareto_front(study: Any) -> tuple[int, ...]:
    """The numbers of the trials no other trial beats on every objective (`best_trials`).

    Empty with one objective.
    """
    if len(study.directions) < 2:
        return ()
    return tuple(sorted(t.number for t in study.best_trials))


def best_trial_value(study: Any) -> float | None:
    """The best trial's validation loss, or None before any trial is complete."""
    best = best_trial(study)
    return None if best is None else best.values[0]


def optimize_trials(study: Any, job: SearchJob, n: int, callbacks: Sequence[Callable]) -> None:
    """Run up to `n` trials in this process, stopping once the study holds enough.

    Raises:
        EnvironmentFailure: When the study's storage fails mid-search (a database server
            gone), in one line naming it, password hidden; the trials it holds are kept.
    """

    def stop_when_done(study: Any, trial: Any) -> None:
        if count_trials(study) >= job.n_trials:  # other processes may have finished the study
            study.stop()

    with storage_failures(job):
        study.optimize(lambda trial: run_trial(trial, job), n_trials=n, catch=job.catch,
                       callbacks=[stop_when_done, *callbacks])  # fmt: skip


@contextlib.contextmanager
def storage_failures(job: SearchJob) -> Iterator[None]:
    """The storage's own errors during a search as `EnvironmentFailure`, in one line."""
    import optuna

    failures: tuple[type[BaseException], ...] = (optuna.exceptions.StorageInternalError,)
    with contextlib.suppress(ImportError):
        from sqlalchemy.exc import SQLAlchemyError

        failures += (SQLAlchemyError,)
    try:
        yield
    except failures as exc:
        where = redact(job.storage or "memory")
        exc = exc.__cause__ or exc  # optuna's wrapper guesses; the driver's error says
        text = re.sub(r"\(Background on this error at:[^)]*\)", "", str(exc))
        text = " ".join(scrub(text, url_secrets(job.storage or "")).split())[:300]
        raise EnvironmentFailure(
            f"the study storage {where} failed during the search ({type(exc).__name__}: "
            f"{text}); the trials it holds are kept: run the same command again when it answers"
        ) from None
