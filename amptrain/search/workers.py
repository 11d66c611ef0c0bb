"""`search --workers N`: trials in N fresh processes on one study, this process showing progress.

The workers end with this process, however it ends: SIGINT and SIGTERM are passed on to them
(a Ctrl-C marks each running trial interrupted; SIGTERM ends them), and on Linux each worker
is told to get SIGTERM when this process dies, SIGKILL included, so no worker runs trials on
as an orphan. A running trial a worker leaves behind stays RUNNING in the study, which fails
and runs it again when the search resumes. A worker that ends early (killed, or the storage
gone) leaving the study short of `--trials` is an error of the whole search (exit 3), never an
exit 0. A worker's own one-line reason travels back to this process, which says it once: the
search ends in one line, not one per process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from amptrain.errors import AmptrainError, EnvironmentFailure, Stopped
from amptrain.interrupts import deferred_signals, end_with_parent
from amptrain.search.study import open_study, optimize_trials

if TYPE_CHECKING:
    from amptrain.search import SearchJob

STORAGE_FAILED = EnvironmentFailure.exit_code
"""A worker's exit code when the study's storage failed, or refused it (its reason is sent
back to the main process)."""


def spawn_workers(job: SearchJob, n: int, workers: int, tick: Callable[[], None]) -> str | None:
    """Run `n` trials in `workers` fresh processes on the study, while this one shows progress.

    Returns:
        None, or which workers ended with an error and how (the caller decides whether the
        study is short for it).

    Raises:
        Stopped: After SIGINT or SIGTERM, once every worker has ended.
    """
    import multiprocessing

    import optuna
    import torch

    # spawn, not fork: a forked child would inherit torch's thread pools and the study's locks.
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // workers)
    shares = [n // workers + (i < n % workers) for i in range(workers)]
    verbosity = optuna.logging.get_verbosity()
    reasons = ctx.SimpleQueue()  # a worker's one-line reason for ending early
    procs = [ctx.Process(target=_worker,
                         args=(job, share, i + 1, threads, verbosity, os.getpid(), reasons))
             for i, share in enumerate(shares) if share]  # fmt: skip
    received: list[int] = []

    def pass_on(signum: int) -> None:
        received.append(signum)
        for proc in procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    try:
        with deferred_signals(pass_on):
            for proc in procs:
                proc.start()
            while any(p.is_alive() for p in procs):
                tick()
                time.sleep(0.2)
    except BaseException:  # a second Ctrl-C, or the storage failing under the progress bar
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        raise
    finally:
        for proc in procs:
            if proc.pid is not None:
                proc.join()
    if received:
        raise Stopped(received[0], "the workers stopped; their running trials are run again "
                                   "when the same command resumes the study")  # fmt: skip
    tick()
    said = []
    while not reasons.empty():
        said.append(reasons.get())
    return _failures([p.exitcode for p in procs], said)


def _failures(codes: list[int | None], reasons: list[str]) -> str | None:
    """What went wrong with the workers that ended with an error; None if none did."""
    failed = [c for c in codes if c]
    if not failed:
        return None
    how = ", ".join(f"by {signal.Signals(-c).name}" if c < 0 else f"with code {c}" for c in failed)
    why = f": {reasons[0]}" if reasons else ""
    return (f"{len(failed)} of {len(codes)} search workers ended before their trials were "
            f"done ({how}){why}")  # fmt: skip


def _worker(
    job: SearchJob, n: int, index: int, threads: int, verbosity: int, parent: int, reasons: object
) -> None:
    import optuna
    import torch

    if sys.platform == "linux":
        end_with_parent(parent)
    torch.set_num_threads(threads)  # the workers share the cores
    optuna.logging.set_verbosity(verbosity)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # the trial is already marked interrupted
            optimize_trials(open_study(job, worker=index), job, n, [])
    except AmptrainError as exc:  # said once by the main process, not by every worker
        reasons.put(f"worker {index}: {exc}")  # type: ignore[attr-defined]
        sys.exit(getattr(exc, "exit_code", STORAGE_FAILED))
