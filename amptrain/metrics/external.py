"""What every sink that logs to another tool (W&B, TensorBoard, MLflow) shares.

`run_config` builds the run's settings without secrets, plus the resolved precision and its
reason. `ExternalSink` is the contract of the file-based tools: numbers at the global optimizer
step under the loop's metric names, text values (`mem/source`) as text, the settings written
once as hyperparameters when the first metrics arrive (by then the training run has told the
sink the resolved precision and the fast path), and any failure of the tool costs one warning on
the "amptrain" logger and disables the sink, never the training run; the failure is kept in
`failure` (which tool, during what, at which step, the error) for the run's summary. A sink
made with `required=True` (what the CLI does for a tracker it was asked for) raises
`TrackerError` instead when the tool cannot start, before anything has trained.

Only the start talks to the tool on the caller's thread. Everything after it (settings, metrics,
the run's end) goes through a bounded queue to one background thread, so a slow, frozen or dead
server never holds a training step: a call that has not answered within `STALL_S` seconds, or a
queue that fills, counts as the tool's failure (one warning, recorded), and `close` waits at most
`STALL_S` seconds for what is still queued.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from amptrain import secrets
from amptrain.errors import TrackerError

log = logging.getLogger("amptrain")

STALL_S = 5.0
"""The longest a tracker call may go unanswered before the tool counts as failed, and the
longest `close` waits for what is still queued."""
QUEUE_SIZE = 1000
"""Calls that may wait for the background thread; one more is the tool's failure."""


def run_config(
    config: Mapping[str, Any] | None, precision: Any = None, reason: str | None = None
) -> dict[str, Any]:
    """The run config: `config` without secrets, plus the resolved precision and its reason.

    A requested precision that differs from the resolved one (e.g. `auto`) is kept as
    `precision_requested`.
    """
    values = clean(config or {})
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
    return secrets.env_secrets("WANDB_API_KEY")


def scrub(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with the W&B API key (from the environment) and `extra` secrets replaced by `***`."""
    return secrets.scrub(text, [*_secrets(), *extra])


def clean(values: Mapping[str, Any]) -> dict[str, Any]:
    """Drop entries that name or hold the API key; nested mappings are cleaned too."""
    secrets = _secrets()
    out = {}
    for name, value in values.items():
        if "api_key" in str(name).lower() or (isinstance(value, str) and value in secrets):
            continue
        out[name] = clean(value) if isinstance(value, Mapping) else value
    return out


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as `a.b` keys; values other than numbers, text and booleans as text."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{key}."))
        else:
            out[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def failure_record(tool: str, during: str, step: int | None, error: str) -> dict[str, Any]:
    """How a tracker failed, as `summary.json` keeps it."""
    return {"sink": tool, "during": during, "step": step, "error": error}


class ExternalSink:
    """A `Sink` over another tool; subclasses write, this class decides what and when.

    Subclasses start the tool through `_open(fn, ...)` and implement `_write_params(params)`,
    `_write_numbers(numbers, step)`, `_write_texts(texts, step)` and `_finish()`; each runs
    guarded (see the module docstring).
    """

    tool = "the tracking tool"
    fix = "check the tool's settings"
    """What to do when the tool cannot start (the end of a refusal's message)."""

    def __init__(self, secrets: Iterable[str] = (), required: bool = False) -> None:
        self._secrets = list(secrets)
        self.required = required
        self.failure: dict[str, Any] | None = None
        """Set when the tool failed: `failure_record(...)`; the sink is disabled from then."""
        self._params: dict[str, Any] = {}
        self._written: dict[str, Any] | None = None  # params as written, once written
        self._texts: dict[str, Any] = {}
        self._step: int | None = None
        self._disabled = self._closed = False
        self._queue: queue.Queue[tuple[str, Callable[..., Any], tuple] | None] = queue.Queue(
            QUEUE_SIZE)  # fmt: skip
        self._thread: threading.Thread | None = None
        self._busy: tuple[str, float, int | None] | None = None  # in flight: what, since, step
        self._call_step: int | None = None  # the step of the call the thread is making

    def _open(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Start the tool: `fn(*args)`; if it fails, raise `TrackerError` (required) or warn."""
        if not self.required:
            result = self._guard("start", fn, *args)
            self._disabled = result is None
            return result
        try:
            return fn(*args)
        except Exception as exc:  # any failure to start: refused with the reason and the fix
            reason = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
            raise TrackerError(f"{self.tool} could not start ({reason}); {self.fix}") from None

    @property
    def enabled(self) -> bool:
        """False once the tool failed (after its one warning)."""
        return not self._disabled

    def log_config(self, values: Mapping[str, Any]) -> None:
        """Add settings; after the first metrics, only settings not written before are added."""
        self._params.update(flatten(clean(values)))
        if self._written is not None:
            self._flush_params()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Numbers as metrics at `step`; text values when they change."""
        if self._closed:
            return
        self._step = int(step)
        if self._written is None:
            self._flush_params()
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        texts = {k: str(v) for k, v in metrics.items()
                 if k not in numbers and self._texts.get(k) != str(v)}  # fmt: skip
        self._texts.update(texts)
        if numbers:
            self._submit("log", self._write_numbers, numbers, int(step))
        if texts:
            self._submit("log", self._write_texts, texts, int(step))

    def close(self) -> None:
        """Write the settings if no metric came, finish the run; wait at most `STALL_S` s."""
        if self._closed:
            return
        if self._written is None:
            self._flush_params()
        self._closed = True
        self._submit("close", self._finish)
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # the thread's last item
        self._thread.join(STALL_S)
        if self._thread.is_alive():
            self._fail("close", f"no answer within {STALL_S:.0f} s; what was still queued is lost")

    def _flush_params(self) -> None:
        written = self._written or {}
        new = {k: v for k, v in self._params.items() if k not in written}
        self._written = {**written, **new}
        if new:
            self._submit("hyperparameters", self._write_params, new)

    def _submit(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)` for the background thread; a stalled or full queue is a failure."""
        busy = self._busy
        if busy is not None and time.monotonic() - busy[1] > STALL_S:
            self._fail(busy[0], f"no answer within {STALL_S:.0f} s", busy[2])
        if self._disabled:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, daemon=True,
                                            name=f"amptrain {self.tool} writer")  # fmt: skip
            self._thread.start()
        try:
            self._queue.put_nowait((what, self._step, fn, args))
        except queue.Full:
            busy = self._busy
            waited = f", the one in flight for {time.monotonic() - busy[1]:.1f} s" if busy else ""
            self._fail(what, f"{QUEUE_SIZE} calls waiting{waited}: the tool does not keep up")

    def flush(self, timeout: float = STALL_S) -> bool:
        """Wait until every queued call is done, at most `timeout` seconds; True if done."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            what, self._call_step, fn, args = item
            self._busy = (what, time.monotonic(), self._call_step)
            self._guard(what, fn, *args)
            self._busy = None
            self._queue.task_done()
        self._queue.task_done()  # the closing None

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self._disabled:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # any failure of the tool: warn once, keep training
            self._fail(what, f"{type(exc).__name__}: {exc}")
            return None

    def _fail(self, what: str, error: str, step: int | None = None) -> None:
        """Disable the sink with one warning and keep the failure; later failures are quiet.

        The failure's step is the failed call's (`step`, or the one the background thread is
        making), not the step training has reached since.
        """
        if self._disabled:
            return
        self._disabled = True
        if step is None:
            worker = threading.current_thread() is self._thread
            step = self._call_step if worker else self._step
        error = scrub(error, self._secrets)
        self.failure = failure_record(self.tool, what, step, error)
        log.warning("%s %s failed (%s); training continues without %s", self.tool, what,
                    error, self.tool)  # fmt: skip

    def _write_params(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def _write_numbers(self, numbers: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _write_texts(self, texts: dict[str, str], step: int) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError
