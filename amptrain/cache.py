"""amptrain's cache folder and its small JSON records, each written whole and renamed into place.

The folder is `$AMPTRAIN_CACHE_DIR`, else `$XDG_CACHE_HOME/amptrain`, else `~/.cache/amptrain`.
Its records only save work or keep a choice (the `auto` precision decisions, the digests of
base models), so a missing, unreadable or unwritable record is only a record fewer, never an
error; two processes writing one record at once may keep either's entries, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("amptrain")


def cache_dir() -> Path:
    """The folder of amptrain's cache (see the module docstring); not created here."""
    if os.environ.get("AMPTRAIN_CACHE_DIR"):
        return Path(os.environ["AMPTRAIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "amptrain"


def read_entries(name: str, folder: Path | None = None) -> dict[str, Any]:
    """The entries of the cache record `name` in `folder` (default `cache_dir()`).

    Empty if the record is missing or unreadable.
    """
    try:
        entries = json.loads(((folder or cache_dir()) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_entries(name: str, entries: dict[str, Any], folder: Path | None = None) -> None:
    """Replace the record `name` in `folder` (default `cache_dir()`) with `entries` atomically.

    The file is readable by the user only. A failure (read-only home, full disk) is logged at
    debug level and otherwise ignored.
    """
    path = (folder or cache_dir()) / name
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600), "w") as f:
            json.dump(entries, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cache record %s not written: %s", path, exc)
        with contextlib.suppress(OSError):  # a folder that cannot exist holds no temporary
            tmp.unlink(missing_ok=True)
