"""MLflow sink (the `mlflow` extra: `mlflow-skinny` is enough), local by default, no server.

The local store is an SQLite file (`mlflow ui --backend-store-uri sqlite:///PATH`): MLflow 3
refuses its old `./mlruns` folder store unless told otherwise, and SQLite needs no server.

Numbers become MLflow metrics under the loop's metric names (`train/loss`, `amp/loss_scale`,
...) at the global optimizer step; text values (`mem/source`) become run tags. The run's
settings, with the resolved precision and its reason, become the run's params. The sink talks
to the store through an `MlflowClient` of its own, so it neither needs nor changes MLflow's
global active run. A failure costs one warning and training goes on (`ExternalSink`); the
password of a tracking URI never appears in a message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from amptrain._imports import requires
from amptrain.metrics.external import ExternalSink, run_config

PARAM_LIMIT = 6000  # characters MLflow keeps of a param's value
BATCH = 100  # params per request: MLflow's own limit per log_batch


def local_store(path: str | Path) -> str:
    """The tracking URI of a local SQLite store at `path` (its folder is created)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _artifacts(uri: str) -> str | None:
    """Beside a local SQLite store (else MLflow's default, `./mlruns` in the working folder)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()


class MlflowSink(ExternalSink):
    """Log metrics to an MLflow run.

    Args:
        tracking_uri: Where runs go: a local SQLite store (see `local_store`) or a tracking
            server's URL; None: `./mlflow.db`.
        experiment: The experiment, created if missing.
        config: Run settings (e.g. `TrainConfig.to_dict()`), logged as params.
        precision: The resolved `Precision` (or its name): `precision` and `precision_reason`.
        precision_reason: Why that precision, when `precision` is given as a name.
        run_name: The run's name; None lets MLflow choose.

    Raises:
        ModuleNotFoundError: If mlflow is not installed (with the install hint).

    Example:
        >>> sink = MlflowSink(local_store("runs/mlruns"), config={"lr": 3e-3})  # doctest: +SKIP
        >>> amptrain.fit(model, train, val, sinks=[sink])  # doctest: +SKIP
    """

    tool = "MLflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "amptrain",
        config: Mapping[str, Any] | None = None,
        *,
        precision: Any = None,
        precision_reason: str | None = None,
        run_name: str | None = None,
    ) -> None:
        requires("mlflow", "mlflow", "the MLflow sink", "use the run directory's metrics.jsonl")
        self.tracking_uri = tracking_uri or local_store("mlflow.db")
        super().__init__(secrets=[urlsplit(self.tracking_uri).password or ""])
        self.run_id: str | None = self._guard("start", self._start, experiment, run_name)
        if self.run_id is None:
            self._disabled = True
        self.log_config(run_config(config, precision, precision_reason))

    def _start(self, experiment: str, run_name: str | None) -> str:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            found = self.client.get_experiment(self.client.create_experiment(
                experiment, artifact_location=_artifacts(self.tracking_uri)))  # fmt: skip
        return self.client.create_run(found.experiment_id, run_name=run_name).info.run_id

    def _write_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + BATCH])

    def _write_numbers(self, numbers: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numbers.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def _write_texts(self, texts: dict[str, str], step: int) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in texts.items()])

    def _finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")
