"""Which model files may run: the ones you name, and the ones this machine trained from.

A model given as a Python file is imported, and importing runs its code with your privileges.
Named on the command line (`--model file.py`), that is what you asked for, and the file's path
and sha256 are remembered in `trusted_model_files.json` in amptrain's cache folder. A run
directory names a model file too (its `base.json`, its `config.json`), and a run directory can
come from someone else: its file is imported only when this machine trained from that very
file (path and sha256 remembered), or when the command says so (`--trust-model-code`, as
Hugging Face's `trust_remote_code`). Otherwise the refusal names the file and both ways on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from amptrain.cache import cache_dir, read_entries, write_entries
from amptrain.errors import ModelError

FILE_NAME = "trusted_model_files.json"
_permitted = False


def permit(trusted: bool = True) -> None:
    """Trust every model file a run directory names, for the rest of the process."""
    global _permitted
    _permitted = trusted


def remember(path: Path) -> None:
    """Remember `path` (with its current sha256) as a file the user named to train from."""
    path = path.expanduser().resolve()
    if not path.is_file():
        return  # the import says the file is missing
    entries = read_entries(FILE_NAME)
    digest = _sha256(path)
    if entries.get(str(path), {}).get("sha256") != digest:
        entries[str(path)] = {
            "sha256": digest,
            "when": dt.datetime.now().isoformat(timespec="seconds"),
        }
        write_entries(FILE_NAME, entries)


def check(path: Path, origin: str, fix: str) -> None:
    """Refuse to import `path`, reached through `origin`, unless it is trusted.

    Args:
        path: The model file.
        origin: What named it, e.g. "the run directory runs/train-1".
        fix: The other way on, besides trusting it.

    Raises:
        ModelError: One line naming the file, its sha256, the flag and `fix`.
    """
    path = path.expanduser().resolve()
    if _permitted or not path.is_file():  # a missing file: the import says so
        return
    digest = _sha256(path)
    if read_entries(FILE_NAME).get(str(path), {}).get("sha256") == digest:
        return
    raise ModelError(
        f"{origin} names the model file {path} (sha256 {digest[:16]}...), which this machine has "
        "not trained from; importing it runs its code with your privileges. Pass "
        f"--trust-model-code if you trust it, or {fix} (trusted files are listed in "
        f"{cache_dir() / FILE_NAME})"
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
