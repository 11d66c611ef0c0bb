"""Weights & Biases sink (the `wandb` extra): metrics at the global step, never at the run's cost.

`WandbSink` implements the `Sink` protocol (`log(metrics, step)`, `close()`), so it goes where
any sink goes: `amptrain.fit(..., sinks=[WandbSink(...)])` or `run_training(cfg, sinks=[...])`.
Numbers are logged under the loop's metric names (`train/loss`, `amp/loss_scale`, ...) at the
global optimizer step; text values such as `mem/source` go into the run config, where W&B
shows them, instead of the history, which charts numbers only. The resolved precision and its
reason go into the run config too.

W&B must never cost the training run. Every W&B call (init, log, config, finish) runs on one
worker thread; a call that raises or does not return within its timeout disables the sink
with exactly one WARNING on `logging.getLogger("amptrain")`, and training goes on; the failure
is kept in `failure` for the run's summary. With `required=True` (what the CLI does for
`--wandb`) a run that cannot start is refused instead (`TrackerError`): no login while online,
a bad key, an init error or timeout. W&B reads
the API key itself (`WANDB_API_KEY`, `wandb login`, offline mode needs none); this module never
asks for, stores or prints it, and any message it writes has the key replaced by `***`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amptrain._imports import requires
from amptrain.errors import TrackerError
from amptrain.metrics.external import clean as _clean
from amptrain.metrics.external import failure_record, run_config, scrub
from amptrain.metrics.sinks import METRIC_NAMES

__all__ = ["WandbSink", "check_login", "run_config", "scrub"]

log = logging.getLogger("amptrain")

_STOP = "stop"

START_FIX = (
    "check the network and the login (`wandb login`), or log offline with "
    "WANDB_MODE=offline and upload later with `wandb sync`"
)


def check_login(mode: str | None = None) -> None:
    """Refuse an online W&B run without credentials, before W&B starts anything.

    The credentials are looked up the way `wandb.init` does (WANDB_API_KEY, an identity token
    file, `wandb login`'s netrc entry, W&B's settings files), without the network and without
    W&B's interactive prompt, which a training run must not wait on.

    Raises:
        ModuleNotFoundError: If wandb is not installed (with the install hint).
        TrackerError: Online with no credentials, or with a malformed API key.
    """
    requires("wandb", "wandb", "the W&B sink", "use the run directory's metrics.jsonl")
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # an older wandb: wandb.init itself decides
        return
    settings = wandb_setup.singleton().settings
    if (mode or settings.mode) in ("offline", "dryrun", "disabled"):
        return
    try:
        found = wbauth.authenticate_session(host=settings.base_url, source="amptrain",
                                            prompt=False, update_session=False)  # fmt: skip
    except Exception as exc:  # a malformed key, two kinds of credentials at once
        raise TrackerError(f"W&B refused the credentials here ({scrub(str(exc))}); fix them "
                           "with `wandb login --relogin`, or log offline with "
                           "WANDB_MODE=offline") from None  # fmt: skip
    if found is None:
        raise TrackerError(
            f"W&B has no login on this machine for {settings.base_url} (no WANDB_API_KEY, no "
            "`wandb login`); log in with `wandb login`, or log offline with WANDB_MODE=offline "
            "and upload later with `wandb sync`"
        )


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
        run_dir: The amptrain run directory this run belongs to: it names the run (unless
            `name=` is given) and its absolute path is the run config's `run_dir` and the
            run's notes.
        required: Refuse (`TrackerError`) when the run cannot start, instead of one warning
            and training without W&B; online, a missing login is refused before W&B starts.
        **init_kwargs: Passed on to `wandb.init` (`dir`, `name`, `tags`, `settings`...); the
            CLI passes `dir=` the `--out` folder, so W&B's files sit beside the run directories.

    Raises:
        ModuleNotFoundError: If wandb is not installed (with the install hint).
        TrackerError: With `required`, if the run cannot start (the reason and the fix).

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
        run_dir: str | Path | None = None,
        required: bool = False,
        **init_kwargs: Any,
    ) -> None:
        requires("wandb", "wandb", "the W&B sink", "use the run directory's metrics.jsonl")
        import wandb

        if required and run is None:
            check_login(mode)
        self.run = run
        self.required = required
        self.failure: dict[str, Any] | None = None
        """Set when W&B failed: `failure_record(...)`; the sink is disabled from then."""
        self._step: int | None = None
        self._start_error: str | None = None
        self._own_run = run is None
        self._log_timeout, self._finish_timeout = log_timeout, finish_timeout
        self._lock = threading.Lock()
        self._warned = self._disabled = self._closed = self._refused = False
        self._files, self._before = Path("wandb"), None
        self._busy: tuple[str, float, float] | None = None  # (what, since, allowed seconds)
        self._texts: dict[str, Any] = {}
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="amptrain-wandb", daemon=True)
        self._worker.start()
        values = run_config(config, precision, precision_reason)
        if run_dir is not None:
            where = str(Path(run_dir).resolve())
            values["run_dir"] = where
            init_kwargs.setdefault("name", Path(run_dir).name)
            init_kwargs.setdefault("notes", f"amptrain run {where}")
        if run is None:
            settings = init_kwargs.pop("settings", None) or {}
            if isinstance(settings, Mapping):
                settings = wandb.Settings(**{"init_timeout": init_timeout, **settings})
            if init_kwargs.get("dir"):  # W&B falls back to a temporary folder if it is missing
                Path(init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
            kwargs = {"reinit": "create_new", **init_kwargs}  # a sink owns its run
            root = init_kwargs.get("dir") or os.environ.get("WANDB_DIR") or "."
            self._files = Path(root) / "wandb"  # what a refused start removes again
            self._before = set(self._files.iterdir()) if self._files.is_dir() else None
            done = threading.Event()
            self._call("init", init_timeout, self._init, wandb, project, values, mode, settings,
                       kwargs, done)  # fmt: skip
            if not done.wait(init_timeout):
                self._start_error = f"W&B did not start a run within {init_timeout:g} s"
            if self._start_error:
                self._refuse_or_warn(self._start_error)
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

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds for the sink's worker to end; True once it has.

        `close()` stops waiting at a stalled W&B call, and a run that started after its
        `init_timeout` is finished by the worker later; this waits for either to end (before
        a process exits, or in a test).
        """
        self._worker.join(timeout)
        return not self._worker.is_alive()

    @property
    def run_id(self) -> str | None:
        """The id of the run this sink started (None for a shared run, or if W&B failed)."""
        return self.run.id if self.run is not None and self._own_run else None

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
                self._fail(what, f"W&B {what} failed ({type(exc).__name__}: {exc})")
            finally:
                self._busy = None
        if self.run is not None and self._own_run:
            self._busy = ("finish", time.monotonic(), self._finish_timeout)
            try:
                self.run.finish()
            except Exception as exc:
                self._fail("finish", f"W&B finish failed ({type(exc).__name__}: {exc})")

    def _refuse_or_warn(self, message: str) -> None:
        """A run that did not start: refused when required, else one warning."""
        if not self.required:
            self._fail("init", message)
            return
        with self._lock:  # refused, not warned: a late init is ended by the worker, silently
            self._disabled = self._warned = self._closed = self._refused = True
        self._queue.put(_STOP)
        self._remove_files()
        raise TrackerError(f"{scrub(message)}; {START_FIX}")

    def _remove_files(self) -> None:
        """Remove what W&B wrote for a refused start: nothing is left of a run never trained."""
        if not self._files.is_dir():
            return
        for entry in set(self._files.iterdir()) - (self._before or set()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if self._before is None:
            with contextlib.suppress(OSError):
                self._files.rmdir()  # W&B's folder, made for this run alone

    def _init(self, wandb: Any, project, values, mode, settings, kwargs, done) -> None:
        try:
            run = wandb.init(project=project, config=values, mode=mode, settings=settings,
                             **kwargs)  # fmt: skip
        except Exception as exc:  # bad key, no network, W&B's own timeout...
            self._start_error = f"W&B init failed ({type(exc).__name__}: {exc})"
            done.set()
            if self._refused:
                self._remove_files()
            return
        if self._disabled:  # it came up after our timeout: end it rather than leave it open
            done.set()
            run.finish()
            if self._refused:
                self._remove_files()
            return
        self.run = run
        done.set()

    def _log_now(self, numbers: dict[str, Any], step: int) -> None:
        self._step = step
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
        self._fail(what, f"W&B {what} has not returned within {allowed:g} s")
        return True

    def _fail(self, what: str, message: str) -> None:
        with self._lock:
            self._disabled = True
            if self.failure is None:
                self.failure = failure_record("W&B", what, self._step, scrub(message))
            if self._warned:
                log.debug("%s", scrub(message))
                return
            self._warned = True
        log.warning("%s; training continues without W&B", scrub(message))
