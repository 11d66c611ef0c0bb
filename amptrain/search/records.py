"""What a finished search returns: one `TrialRecord` per trial and the `SearchResult`.

`result_of` reads them from the Optuna study (any storage), so every process that ran or
resumed a search reports the same study the same way.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from amptrain.config import TrainConfig
from amptrain.search import space as search_space
from amptrain.search.study import (
    STALE,
    best_trial,
    counted,
    pareto_front,
    redact,
    study_settings,
)

if TYPE_CHECKING:
    from amptrain.search import SearchJob


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
    retry_of: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """A finished search.

    `best_*` is the COMPLETE trial of lowest validation loss (with two objectives, the one of
    the Pareto front with the lowest validation loss).
    """

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
    pareto_front: tuple[int, ...] = ()
    """With two objectives, the trials no other trial beats on both (validation loss and
    tokens/s), by number; empty with one objective."""

    @property
    def all_trials(self) -> list[dict[str, Any]]:
        """The original tier-3 shape: `{number, value, params}` per trial."""
        return [{"number": t.number, "value": t.value, "params": t.params} for t in self.trials]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (without the Optuna study)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "study"}
        out["trials"] = [t.to_dict() for t in self.trials]
        return {**out, "all_trials": self.all_trials}


def result_of(study: Any, job: SearchJob) -> SearchResult:
    """The study's trials and best trial as records, for `job`'s settings."""
    trials = tuple(trial_record(t) for t in study.get_trials(deepcopy=False))
    best = best_trial(study)
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
        settings=study_settings(job), trials=trials, study=study,
        pareto_front=pareto_front(study),
    )  # fmt: skip


def trial_record(t: Any) -> TrialRecord:
    """One Optuna trial as a `TrialRecord`."""
    duration = None if t.duration is None else t.duration.total_seconds()
    reason = t.user_attrs.get("reason") or (STALE if t.state.name == "FAIL" else None)
    return TrialRecord(
        number=t.number, state=t.state.name, value=None if t.values is None else t.values[0],
        values=None if t.values is None else tuple(t.values), params=dict(t.params),
        reason=reason, duration_s=duration,
        metrics=dict(t.user_attrs.get("metrics", {})),
        intermediate=dict(t.intermediate_values), baseline=bool(t.user_attrs.get("baseline")),
        # Optuna's retry callback names the trial a retry replaces (`retried_trial_number`).
        counted=counted(t), retry_of=t.system_attrs.get("failed_trial"),
    )  # fmt: skip
