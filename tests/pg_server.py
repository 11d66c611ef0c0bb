"""A throwaway PostgreSQL server for tests, started from the machine's own server binaries.

`PgServer` runs `initdb` (password authentication only) in a fresh temporary directory,
starts `postgres` through `pg_ctl` on 127.0.0.1 at a free port (its Unix socket stays in that
directory), and on `stop()` shuts it down and removes the directory. PostgreSQL refuses to run
as root, so when the tests run as root (CI does) the server runs as the unprivileged `nobody`
user, which owns the directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "amptrain"
PASSWORD = "pg-test-Secret-42"
SERVER_USER = "nobody"


def find_bindir() -> Path | None:
    """The folder holding `initdb` and `pg_ctl`: `AMPTRAIN_PG_BIN`, Debian's layout, or PATH."""
    candidates = [os.environ.get("AMPTRAIN_PG_BIN", "")]
    # Debian keeps the server binaries out of PATH, one folder per major version.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major, reverse=True)
    found = shutil.which("initdb")
    candidates.append(str(Path(found).parent) if found else "")
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def _major(folder: str) -> int:
    version = Path(folder).parent.name
    return int(version) if version.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One running server; `url(db)` gives a SQLAlchemy URL with the password in it."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="amptrain-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as = {}
        if os.geteuid() == 0:  # initdb and postgres refuse root
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def start(self) -> PgServer:
        """initdb with a password for `USER`, then start the server and wait until it accepts."""
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._as:
            os.chown(pwfile, self._as["user"], self._as["group"])
        self._run("initdb", "-D", self.data, "-U", USER, "--pwfile", pwfile,
                  "--auth", "scram-sha-256", "-E", "UTF8", "--no-sync")  # fmt: skip
        pwfile.unlink()
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")  # fmt: skip
        self._run("pg_ctl", "start", "-D", self.data, "-l", self.root / "server.log",
                  "-w", "-t", "60", "-o", options)  # fmt: skip
        return self

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        """`postgresql://USER:password@127.0.0.1:PORT/database`."""
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database `name`; returns its URL."""
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD,
                             dbname="postgres", autocommit=True) as conn:  # fmt: skip
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        """The server's log, for a failing test's report."""
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop the server at once (its data is thrown away) and remove the directory."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-D", self.data, "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, tool: str, *args: object) -> None:
        command = [str(self.bindir / tool), *map(str, args)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.root,
                              timeout=120, **self._as)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}):\n{done.stdout}\n"
                               f"{done.stderr}\n{self.log()}")  # fmt: skip
