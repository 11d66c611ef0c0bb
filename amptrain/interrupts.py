"""SIGINT and SIGTERM as requests to stop at a safe point, instead of ending the process.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM at any moment, and a person sends
Ctrl-C. Inside `deferred_signals` the first such signal only calls `on_signal(signum)`; the
work in progress decides where it is safe to stop (after the current step, once its checkpoint
is written). A second Ctrl-C raises `KeyboardInterrupt`, for a person who will not wait.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

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
