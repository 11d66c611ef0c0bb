"""MLflow sink (the `mlflow` extra: `mlflow-skinny` is enough), local by default, no server.

The local store is an SQLite file (`mlflow ui --backend-store-uri sqlite:///PATH`), which needs
no server. A folder store (`file:./mlruns`, the form MLflow 2 and Lightning use) is written too:
MLflow 3 refuses it unless `MLFLOW_ALLOW_FILE_STORE` is set, so the sink sets that opt-in around
its own calls only, and says once how to view the folder.

Numbers become MLflow metrics under the loop's metric names (`train/loss`, `amp/loss_scale`,
...) at the global optimizer step; text values (`mem/source`) become run tags. The run's
settings, with the resolved precision and its reason, become the run's params. The sink talks
to the store through an `MlflowClient` of its own, so it neither needs nor changes MLflow's
global active run. A failure costs one warning and training goes on (`ExternalSink`); the
password of a tracking URI never appears in a message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from amptrain._imports import requires
from amptrain.metrics.external import ExternalSink, run_config
from amptrain.secrets import redact, url_secrets

log = logging.getLogger("amptrain")

PARAM_LIMIT = 6000  # characters MLflow keeps of a param's value
BATCH = 100  # params per request: MLflow's own limit per log_batch


def local_store(path: str | Path) -> str:
    """The tracking URI of a local SQLite store at `path` (its folder is created)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def tracking_uri(text: str, out: str | Path = ".") -> str:
    """The tracking URI `--mlflow TEXT` means: empty is `OUT/mlflow.db`, a `.db` path SQLite."""
    if not text:
        return local_store(Path(out) / "mlflow.db")
    if not urlsplit(text).scheme and text.endswith(".db"):
        return local_store(text)
    return text


def is_file_store(uri: str) -> bool:
    """True for MLflow's folder store: `file:` URIs and plain paths."""
    return urlsplit(uri).scheme in ("", "file")


# MLflow reads its HTTP client's limits from the environment at each request. Its defaults
# (a 120 s timeout, 7 retries with backoff) hold a call for minutes on a dead or frozen server;
# these hold it seconds, and the sink's background thread keeps even that off the training step.
# MLflow's own "View run at URL" line would print the URL as given, password included; the sink
# prints it redacted instead. The user's own settings of these variables win.
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}  # fmt: skip


@contextlib.contextmanager
def _client_env(file_store: bool) -> Iterator[None]:
    """`CLIENT_ENV`, and MLflow 3's opt-in for its folder store, while the sink's calls run."""
    wanted = {**CLIENT_ENV, **({"MLFLOW_ALLOW_FILE_STORE": "true"} if file_store else {})}
    added = [name for name in wanted if name not in os.environ]
    os.environ.update({name: wanted[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _artifacts(uri: str) -> str | None:
    """Beside a local SQLite store (else MLflow's default, `./mlruns` in the working folder)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()


class MlflowSink(ExternalSink):
    """Log metrics to an MLflow run.

    Args:
        tracking_uri: Where runs go: a local SQLite store (see `local_store`), a folder store
            (`file:./mlruns`), or a tracking server's URL; None: `./mlflow.db`.
        experiment: The experiment, created if missing.
        config: Run settings (e.g. `TrainConfig.to_dict()`), logged as params.
        precision: The resolved `Precision` (or its name): `precision` and `precision_reason`.
        precision_reason: Why that precision, when `precision` is given as a name.
        run_name: The run's name; None: the run directory's name, else MLflow's choice.
        run_dir: The amptrain run directory this run belongs to: its absolute path is the
            run's `amptrain.run_dir` tag and its description.
        required: Raise `TrackerError` if the store cannot be opened, instead of one warning
            and training without MLflow.

    Raises:
        ModuleNotFoundError: If mlflow is not installed (with the install hint).
        TrackerError: With `required`, if the store or server cannot be used.

    Example:
        >>> sink = MlflowSink(local_store("runs/mlruns"), config={"lr": 3e-3})  # doctest: +SKIP
        >>> amptrain.fit(model, train, val, sinks=[sink])  # doctest: +SKIP
    """

    tool = "MLflow"
    fix = (
        "check that the tracking server answers, or that the store's folder can be written; "
        "--mlflow alone logs to a local SQLite store OUT/mlflow.db"
    )

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "amptrain",
        config: Mapping[str, Any] | None = None,
        *,
        precision: Any = None,
        precision_reason: str | None = None,
        run_name: str | None = None,
        run_dir: str | Path | None = None,
        required: bool = False,
    ) -> None:
        requires("mlflow", "mlflow", "the MLflow sink", "use the run directory's metrics.jsonl")
        self.tracking_uri = tracking_uri or local_store("mlflow.db")
        super().__init__(secrets=url_secrets(self.tracking_uri), required=required)
        self._file_store = is_file_store(self.tracking_uri)
        tags = {}
        if run_dir is not None:
            where = str(Path(run_dir).resolve())
            tags = {"amptrain.run_dir": where, "mlflow.note.content": f"amptrain run {where}"}
            run_name = run_name or Path(run_dir).name
        self.run_id: str | None = self._open(self._begin, experiment, run_name, tags)
        if self.run_id is not None and self._file_store:
            log.info("MLflow: folder store %s written through MLFLOW_ALLOW_FILE_STORE; view it "
                     "with MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri %s",
                     self.tracking_uri, self.tracking_uri)  # fmt: skip
        self.log_config(run_config(config, precision, precision_reason))

    def _begin(self, experiment: str, run_name: str | None, tags: dict[str, str]) -> str:
        from mlflow.tracking import MlflowClient

        with _client_env(self._file_store):
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                found = self.client.get_experiment(self.client.create_experiment(
                    experiment, artifact_location=_artifacts(self.tracking_uri)))  # fmt: skip
            run = self.client.create_run(found.experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id

    def _guard(self, what: str, fn: Any, *args: Any) -> Any:
        with _client_env(self._file_store):
            return super()._guard(what, fn, *args)

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
        if urlsplit(self.tracking_uri).scheme in ("http", "https"):
            run = self.client.get_run(self.run_id)
            where = redact(self.tracking_uri).rstrip("/")
            log.info("MLflow run %s: %s/#/experiments/%s/runs/%s", run.info.run_name, where,
                     run.info.experiment_id, self.run_id)  # fmt: skip
