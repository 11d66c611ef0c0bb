"""SIGINT and SIGTERM as requests to stop at a safe point, instead of ending the process.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM at any moment, and a person sends
Ctrl-C. Inside `deferred_signals` the first such signal only calls `on_signal(signum)`; the
work in progress decides where it is safe to stop (after the current step, once its checkpoint
is written). A second Ctrl-C raises `KeyboardInterrupt`, for a person who will not wait.

The training loop's side: `stop_handler` records the request in the run's state (and cuts an
evaluation short), and `agree_on_stop` turns requests into the stop, at once in one process
and on logging steps only under several (every rank must stop at the same step).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from amptrain import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_signals(on_signal: Callable[[int], None], enabled: bool = True) -> Iterator[None]:
    """Route SIGINT/SIGTERM to `on_signal` while the block runs; restore the handlers after.

    Args:
        on_signal: Called with the signal number; it may raise to cut short interruptible work.
        enabled: False leaves the handlers alone (a library caller keeps its own).

    Python runs handlers in the main thread only, so in other threads this does nothing.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort without waiting
        received.append(signum)
        on_signal(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class EvalCut(Exception):
    """A signal cut an evaluation short; the step's weights are saved, the evaluation is owed."""


def stop_handler(state: Any) -> Callable[[int], None]:
    """The `on_signal` of a training run: record the request in `state` (a `loop.TrainState`).

    An evaluation that one process runs is cut short at once (`EvalCut`): it can take minutes,
    and a grace period may be seconds. Otherwise the loop agrees on the stop (`agree_on_stop`).
    """

    def request_stop(signum: int) -> None:
        state.stop_requested = signum
        if state.evaluating:
            state.stop_signal, state.should_stop = signum, True  # one process only
            state.evaluating = False
            raise EvalCut

    return request_stop


def agree_on_stop(state: Any, synced: bool = True) -> None:
    """Turn a stop asked on this process (a signal, a callback's `should_stop`) into the stop.

    One process stops at once. Under torch.distributed every rank must stop at the same step,
    and agreeing is a collective with a host read: the ranks agree on `synced` steps only
    (logging, evaluation, checkpoint), and a request waits here for the next of them.
    """
    if state.should_stop and not state.stop_signal:  # a callback's, this step
        state.stop_requested, state.should_stop = state.stop_requested or -1, False
    agreed = state.stop_requested
    if distributed.world()[1] > 1:
        if not synced:
            return
        signum, asked = distributed.all_reduce(
            [max(state.stop_requested, 0), state.stop_requested != 0], "max"
        )  # the signal if any rank had one, else a callback's (-1) if any rank had one
        # Not written back: a signal that came during the collective waits for the next one.
        agreed = int(signum) or (-1 if asked else 0)
    if agreed:
        state.should_stop, state.stop_signal = True, max(agreed, 0)


def run_child(argv: list[str]) -> int:
    """Run `argv` as a child process that ends with this one, and return its exit code.

    SIGINT and SIGTERM that reach this process are passed on to the child (torch's launcher
    passes them to its workers, which checkpoint and stop), and the exit code is then the
    signal's, as one process would give it (130, 143). On Linux the child is also told to get
    SIGTERM when this process dies however it dies (SIGKILL included), so no worker trains on
    as an orphan beside a later resume.
    """
    ends = functools.partial(end_with_parent, os.getpid()) if sys.platform == "linux" else None
    child = subprocess.Popen(argv, preexec_fn=ends)
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        code = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 128 + received[0] if received else code


def end_with_parent(parent: int) -> None:
    """In a child of `parent` (Linux): get SIGTERM when `parent` dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call: act as if told
        os.kill(os.getpid(), signal.SIGTERM)
