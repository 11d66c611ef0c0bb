"""A search's journal file, checked before optuna replays it.

Optuna's journal is one JSON record a line, appended whole. A worker killed while appending
leaves the last record cut (no newline): optuna skips it when reading, but the next append
lands on the same line and the journal can no longer be read at all. So before a study opens
its journal, a cut last record is cut off (after a backup beside the file, with a warning), and
a damaged record anywhere else is refused with the file, the line and how to recover, instead
of a bare JSON decoder message.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from amptrain.errors import ConfigError
from amptrain.runs import private_file

log = logging.getLogger("amptrain")

# Optuna writes every record as a JSON object whose first key is its operation.
_RECORD_START = b'{"op_code"'


def open_journal(path: str | Path) -> Any:
    """An optuna `JournalStorage` on `path` (created, private), once the file is checked.

    The check and any repair hold the journal's own lock, so a worker appending at that moment
    is never cut off.

    Raises:
        ConfigError: If a record other than a cut last one is damaged; names the line and the fix.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    path = private_file(path)
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()  # waits; a lock left by a killed worker is broken after its grace period
    try:
        repair(path)
    finally:
        lock.release()
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:  # one optuna cannot replay
        raise ConfigError(f"{_damaged(path, None, exc)}; {_recover(path, None)}") from None


def repair(path: Path) -> None:
    """Cut a journal's cut last record off (backed up first); refuse one damaged elsewhere.

    Raises:
        ConfigError: Naming the file, the damaged line and how to recover.
    """
    data = path.read_bytes()
    whole, _, tail = data.rpartition(b"\n")
    whole = whole + b"\n" if whole or data.startswith(b"\n") else b""
    operations = _operations()
    for number, line in enumerate(whole.splitlines(), start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or record.get("op_code") not in operations:
                code = record.get("op_code") if isinstance(record, dict) else None
                raise ValueError(f"op_code {code!r} is none of optuna's {sorted(operations)}")
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{_damaged(path, number, exc)}; {_recover(path, number)}") from None
    if not tail:
        return
    if not tail.startswith(_RECORD_START):  # not optuna's: never cut what may be another file
        last = whole.count(b"\n") + 1
        problem = _damaged(path, last, ValueError("not a journal record"))
        raise ConfigError(f"{problem}; {_recover(path, last)}")
    backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
    shutil.copy2(path, backup)
    os.chmod(backup, 0o600)
    os.truncate(path, len(whole))
    log.warning(
        "search journal %s ended in a record cut by an interrupted write (%d bytes); cut it "
        "off, keeping the %d whole records (the file as it was: %s)",
        path, len(tail), whole.count(b"\n"), backup,
    )  # fmt: skip


def _operations() -> set[int]:
    """The operation codes of optuna's journal records (optuna 4.0-5.1 have these eleven)."""
    try:  # optuna's own list where it still has it, else the one of the versions we know
        from optuna.storages.journal._storage import JournalOperation
    except ImportError:
        return set(range(11))
    return {int(op) for op in JournalOperation}


def _damaged(path: Path, line: int | None, exc: Exception) -> str:
    where = f" at line {line}" if line else ""
    return f"search journal {path} is damaged{where} ({type(exc).__name__}: {exc})"


def _recover(path: Path, line: int | None) -> str:
    keep = (
        f"keep the records before it (head -n {line - 1} {path} > {path}.fixed, then "
        f"--storage {path}.fixed), losing the trials logged after them, "
        if line and line > 1
        else ""
    )
    return (
        f"restore it from a backup, or {keep}or start a new search with another --study-name "
        "or --storage"
    )
