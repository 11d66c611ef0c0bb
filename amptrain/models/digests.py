"""The sha256 of a base model's files, computed once per version of those files.

A fine-tuning run records its base by a sha256 of the files that define it (see
`provenance`), and a run loaded later checks that digest again. Hashing a multi-GB base every
time costs minutes, so a digest is remembered in `base-digests.json` in amptrain's cache
folder (see `amptrain.cache`), keyed by each file's absolute path, size, modification time in
nanoseconds and inode. While none of them changes, the remembered digest stands for the files:
editing a file in place changes its mtime, replacing it (a new download, a `mv`) its inode,
and either hashes the files again. What is trusted: a rewrite that keeps the size and then
sets the mtime back (`os.utime`) goes unnoticed, as it does for make and rsync. A file changed
in the last `SETTLE_S` seconds is not remembered, since a second write within the same tick
of a coarse clock would keep its mtime (git's "racily clean" rule).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

from amptrain.cache import read_entries, write_entries

FILE_NAME = "base-digests.json"
KEEP = 64
"""Digests remembered at most; the least recently computed are forgotten first."""
SETTLE_S = 2.0
"""A digest is remembered only when every file is older than this."""


def files_digest(files: Sequence[Path]) -> str:
    """sha256 over each file's name and content, in the given order; remembered (see above)."""
    stats = identity(files)
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    entries = read_entries(FILE_NAME)
    entry = entries.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hash_files(files)
    newest = max((mtime_ns for _, _, mtime_ns, _ in stats), default=0)
    if time.time_ns() - newest > SETTLE_S * 1e9:
        entries.pop(key, None)
        entries[key] = {"sha256": digest, "files": [path for path, *_ in stats]}
        write_entries(FILE_NAME, dict(list(entries.items())[-KEEP:]))
    return digest


def identity(files: Sequence[Path]) -> list[list]:
    """What a remembered digest belongs to: every file's real path, size, mtime_ns and inode."""
    stats = []
    for file in files:
        st = Path(file).stat()
        stats.append([str(Path(file).resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    return stats


def hash_files(files: Sequence[Path]) -> str:
    """sha256 over each file's name, a NUL, and its content, in order, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(Path(file).name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
