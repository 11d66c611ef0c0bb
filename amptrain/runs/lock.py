"""One process per run directory: an OS lock on the directory, held for the run's life.

Two `--resume auto` on the same run would both train it and overwrite each other's metrics,
checkpoints and config. The process that trains a run holds an exclusive `flock` on the run
directory itself, from before it reads anything for a resume until it has written its last
file; once its checks have passed it says who holds it in `.owner` (PID, host, since when),
which the refusal of a second process quotes. The kernel releases the lock when the process
ends however it ends, so a crash leaves no stale lock; and a refused second process changes no
byte of the run.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path

from amptrain.errors import AmptrainError

OWNER_FILE = ".owner"


class RunInUseError(AmptrainError):
    """Another process holds the run directory's lock (exit code 2, before any work)."""


class RunLock:
    """The held lock of one run directory; `release` (or the process's end) gives it back."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir, self._fd, self._announced = run_dir, fd, False

    def announce(self) -> None:
        """Write who holds the run into `.owner` (once the run's checks have passed)."""
        since = dt.datetime.now().isoformat(timespec="seconds")
        owner = self.run_dir / OWNER_FILE
        owner.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        self._announced = True

    def release(self) -> None:
        """Give the lock back (closing the directory unlocks it)."""
        if self._fd is None:
            return
        if self._announced:
            (self.run_dir / OWNER_FILE).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def acquire(run_dir: str | Path) -> RunLock:
    """Lock `run_dir` for this process, or refuse in one line naming the holder.

    Raises:
        RunInUseError: Another process holds it.
    """
    import fcntl  # POSIX

    run_dir = Path(run_dir)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = (run_dir / OWNER_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            holder = "another process"
        raise RunInUseError(
            f"{run_dir} is being trained by {holder or 'another process'}; two processes on one "
            "run would overwrite each other's checkpoints and metrics: wait for it to end (or "
            "stop it), then resume"
        ) from None
    return RunLock(run_dir, fd)
