"""A real MLflow tracking server for tests, on 127.0.0.1 at a free port.

`MlflowServer` starts `mlflow server` (the `flask` and `flask-cors` packages beside
`mlflow-skinny`, in the dev extra) with a SQLite store in a temporary folder, in a process group
of its own, and can freeze it (SIGSTOP to the group: it accepts connections and never answers),
kill it, and stop it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from spawning import free_port


def available() -> bool:
    """True where `mlflow server` can run here."""
    try:
        import flask  # noqa: F401
        import flask_cors  # noqa: F401
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


class MlflowServer:
    """One running server; `url` is where it answers."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="amptrain-mlflow-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        """Start the server and wait until it answers a request."""
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--default-artifact-root", str(self.root / "artifacts")]  # fmt: skip
        log = (self.root / "server.log").open("w")
        self.process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=log,
                                        start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server ended: {self.log()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout} s")

    def log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")

    def signal(self, sig: int) -> None:
        """`sig` to the server and every process it started."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def freeze(self) -> None:
        """Stop answering: connections are accepted by the kernel and wait forever."""
        self.signal(signal.SIGSTOP)

    def kill(self) -> None:
        """Die at once, as a crashed server does."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """Kill the server and remove its folder."""
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
