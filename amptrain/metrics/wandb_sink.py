"""Weights & Biases sink (the `wandb` extra): metrics at the global step, never at the run's cost.

`WandbSink` implements the `Sink` protocol (`log(metrics, step)`, `close()`), so it goes where
any sink goes: `amptrain.fit(..., sinks=[WandbSink(...)])` or `run_training(cfg, sinks=[...])`.
Numbers are logged under the loop's metric names (`train/loss`, `amp/loss_scale`, ...) at the
global optimizer step; text values such as `mem/source` go into the run config, where W&B
shows them, instead of the history, which charts numbers only. The resolved precision and its
reason go into the run config too.

W&B must never cost the training run. Every W&B call (init, log, config, finish) runs on one
worker thread; a call that raises or does not return within its timeout disables the sink
with exactly one WARNING on `logging.getLogger("amptrain")`, and training goes on. W&B reads
the API key itself (`WANDB_API_KEY`, `wandb login`, offline mode needs none); this module never
asks for, stores or prints it, and any message it writes has the key replaced by `***`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amptrain._imports import requires
from amptrain.metrics.sinks import METRIC_NAMES
from amptrain.secrets import env_secrets, scrub

log = logging.getLogger("amptrain")

_STOP = "stop"


class WandbSink:
    """Log metrics to a Weights & Biases run.

    Args:
        project: The W&B project; None lets W&B choose (`WANDB_PROJECT`, else "uncategorized").
        config: Run settings for the run config (e.g. `TrainConfig.to_dict()`).
        mode: `online`, `offline` or `disabled`; None honours `WANDB_MODE`, else online.
        init_timeout: Seconds to wait for the run to start before giving up (one warning).
        precision: The resolved `Precision` (or its name): its name and reason go into the
            run config as `precision` and `precision_reason`.
        precision_reason: Why that precision, when `precision` is given as a name.
        run: An already started W&B run to log into instead of starting one (a notebook's
            `wandb.init()`); it is not finished on `close()`. Its step counter belongs to
            its owner, so records go in at W&B's own step with `global_step` beside them, set
            as the x-axis of amptrain's metrics (`define_metric`): nothing is dropped as out
            of order when the run already holds later steps.
        log_timeout: Seconds one W&B call may block before the sink gives up (one warning).
        finish_timeout: Seconds `close()` waits for the run to finish (uploads, online).
        **init_kwargs: Passed on to `wandb.init` (`dir`, `name`, `tags`, `settings`...); the
            CLI passes `dir=` the `--out` folder, so W&B's files sit beside the run directories.

    Raises:
        ModuleNotFoundError: If wandb is not installed (with the install hint).

    Example:
        >>> prec = amptrain.resolve("auto", "cpu")  # doctest: +SKIP
        >>> sink = WandbSink("my-project", config={"lr": 1e-3}, precision=prec)  # doctest: +SKIP
        >>> amptrain.fit(model, train, val, precision=prec, sinks=[sink])  # doctest: +SKIP
    """

    def __init__(
        self,
        project: str | None = None,
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        init_timeout: float = 90.0,
        *,
        precision: Any = None,
        precision_reason: str | None = None,
        run: Any = None,
        log_timeout: float = 60.0,
        finish_timeout: float = 300.0,
        **init_kwargs: Any,
    ) -> None:
        requires("wandb", "wandb", "the W&B sink", "use the run directory's metrics.jsonl")
        import wandb

        self.run = run
        self._own_run = run is None
        self._log_timeout, self._finish_timeout = log_timeout, finish_timeout
        self._lock = threading.Lock()
        self._warned = self._disabled = self._closed = False
        self._busy: tuple[str, float, float] | None = None  # (what, since, allowed seconds)
        self._texts: dict[str, Any] = {}
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="amptrain-wandb", daemon=True)
        self._worker.start()
        values = run_config(config, precision, precision_reason)
        if run is None:
            settings = init_kwargs.pop("settings", None) or {}
            if isinstance(settings, Mapping):
                settings = wandb.Settings(**{"init_timeout": init_timeout, **settings})
            if init_kwargs.get("dir"):  # W&B falls back to a temporary folder if it is missing
                Path(init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
            kwargs = {"reinit": "create_new", **init_kwargs}  # a sink owns its run
            done = threading.Event()
            self._call("init", init_timeout, self._init, wandb, project, values, mode, settings,
                       kwargs, done)  # fmt: skip
            if not done.wait(init_timeout):
                self._fail(f"W&B did not start a run within {init_timeout:g} s")
        else:
            self._call("define", self._log_timeout, self._define_axis)
            if values:
                self.log_config(values)

    # -- public API -----------------------------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue `metrics` for the run at optimizer step `step`; returns at once."""
        if not self._usable():
            return
        numbers, texts = {}, {}
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[name] = value
            elif self._texts.get(name) != value:
                texts[name] = value
        if texts:
            self._texts.update(texts)
            self._call("config", self._log_timeout, self._update_config, texts)
        if numbers:
            self._call("log", self._log_timeout, self._log_now, numbers, int(step))

    def log_config(self, values: Mapping[str, Any]) -> None:
        """Add or overwrite run-config entries (e.g. the precision resolved after start)."""
        if self._usable():
            self._call("config", self._log_timeout, self._update_config, _clean(values))

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Set run-summary figures: end results that belong to no step."""
        if self._usable():
            self._call("summary", self._log_timeout, self._update_summary, dict(values))

    def close(self) -> None:
        """Wait for queued records, finish the run (if this sink started it), stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        # Poll rather than join(timeout): every queued call has its own time limit.
        while self._worker.is_alive() and not self._stalled():
            self._worker.join(0.05)

    @property
    def enabled(self) -> bool:
        """False once W&B failed or timed out (after its one warning)."""
        return not self._disabled

    # -- worker ---------------------------------------------------------------------------

    def _call(self, what: str, timeout: float, fn: Any, *args: Any) -> None:
        self._queue.put((what, timeout, fn, args))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item == _STOP:
                break
            what, timeout, fn, args = item
            if self._disabled:
                continue
            self._busy = (what, time.monotonic(), timeout)
            try:
                fn(*args)
            except Exception as exc:  # any W&B error: warn once, keep training
                self._fail(f"W&B {what} failed ({type(exc).__name__}: {exc})")
            finally:
                self._busy = None
        if self.run is not None and self._own_run:
            self._busy = ("finish", time.monotonic(), self._finish_timeout)
            try:
                self.run.finish()
            except Exception as exc:
                self._fail(f"W&B finish failed ({type(exc).__name__}: {exc})")

    def _init(self, wandb: Any, project, values, mode, settings, kwargs, done) -> None:
        try:
            run = wandb.init(project=project, config=values, mode=mode, settings=settings,
                             **kwargs)  # fmt: skip
        except Exception as exc:  # bad key, no network, W&B's own timeout...
            self._fail(f"W&B init failed ({type(exc).__name__}: {exc})")
            done.set()
            return
        if self._disabled:  # it came up after our timeout: end it rather than leave it open
            done.set()
            run.finish()
            return
        self.run = run
        done.set()

    def _log_now(self, numbers: dict[str, Any], step: int) -> None:
        if self._own_run:
            self.run.log(numbers, step=step)
        else:
            self.run.log({**numbers, "global_step": step})

    def _define_axis(self) -> None:
        self.run.define_metric("global_step")
        for space in sorted({name.split("/")[0] for name in METRIC_NAMES if "/" in name}):
            self.run.define_metric(f"{space}/*", step_metric="global_step")

    def _update_config(self, values: Mapping[str, Any]) -> None:
        self.run.config.update(dict(values), allow_val_change=True)

    def _update_summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(values)

    # -- failure handling -----------------------------------------------------------------

    def _usable(self) -> bool:
        return not (self._disabled or self._closed or self._stalled())

    def _stalled(self) -> bool:
        """True (after the one warning) once a W&B call has run past its time limit."""
        busy = self._busy
        if busy is None:
            return False
        what, since, allowed = busy
        if time.monotonic() - since <= allowed:
            return False
        self._fail(f"W&B {what} has not returned within {allowed:g} s")
        return True

    def _fail(self, message: str) -> None:
        with self._lock:
            self._disabled = True
            if self._warned:
                log.debug("%s", scrub(message, _secrets()))
                return
            self._warned = True
        log.warning("%s; training continues without W&B", scrub(message, _secrets()))


def run_config(
    config: Mapping[str, Any] | None, precision: Any = None, reason: str | None = None
) -> dict[str, Any]:
    """The run config: `config` without secrets, plus the resolved precision and its reason.

    A requested precision that differs from the resolved one (e.g. `auto`) is kept as
    `precision_requested`.
    """
    values = _clean(config or {})
    if precision is not None:
        name = getattr(precision, "name", precision)
        reason = getattr(precision, "reason", reason)
        requested = values.get("precision")
        if requested is not None and requested != name:
            values["precision_requested"] = requested
        values["precision"] = name
        if reason is not None:
            values["precision_reason"] = reason
    return values


def _secrets() -> list[str]:
    return env_secrets("WANDB_API_KEY")


def _clean(values: Mapping[str, Any]) -> dict[str, Any]:
    """Drop entries that name or hold the API key; nested mappings are cleaned too."""
    secrets = _secrets()
    out = {}
    for name, value in values.items():
        if "api_key" in str(name).lower() or (isinstance(value, str) and value in secrets):
            continue
        out[name] = _clean(value) if isinstance(value, Mapping) else value
    return out
