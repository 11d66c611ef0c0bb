"""Which format a `--data` path is in, chosen by its name and checked against its first bytes.

A file's suffix names its format (`.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`, `.arrow`,
`.bin`, and
the text formats with `.gz` after them); any other file is read as plain text when its first
bytes are text, and refused otherwise.
A folder is a `datasets` `save_to_disk` folder when it has that layout, else a folder of such
files, whose other files are skipped with the reason logged. A file that is not text (NUL
bytes, or the magic number of gzip, zip, Parquet, ELF, PNG...) is refused by name with the
list of the formats amptrain reads, before anything is tokenized.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import zlib
from pathlib import Path
from typing import BinaryIO

from amptrain.errors import DataError

log = logging.getLogger("amptrain")

SUFFIXES = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
    ".parquet": "parquet", ".arrow": "arrow", ".bin": "tokens",
}  # fmt: skip

SUPPORTED = (
    "text (.txt or any UTF-8 text file), JSONL (.jsonl), JSON (.json: a list of records or "
    "strings), CSV (.csv), TSV (.tsv), each of these gzip-compressed (.gz), Parquet (.parquet), "
    "Arrow (.arrow, as datasets caches), token files (.bin, uint16/uint32, nanoGPT/litgpt), a "
    "datasets save_to_disk folder, or a folder of these"
)

# Magic numbers of common binary files, so a misnamed one is refused by what it is.
_MAGIC = (
    (b"\x1f\x8b", "a gzip file"), (b"PK\x03\x04", "a zip file (or .pt, .docx, .xlsx)"),
    (b"PAR1", "a Parquet file"), (b"\x7fELF", "an ELF executable"), (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"), (b"%PDF", "a PDF document"),
    (b"BZh", "a bzip2 file"), (b"\xfd7zXZ\x00", "an xz file"), (b"(\xb5/\xfd", "a zstd file"),
    (b"7z\xbc\xaf", "a 7z file"), (b"\x93NUMPY", "a NumPy .npy file"),
    (b"ARROW1", "an Arrow file"), (b"\xff\xff\xff\xff", "an Arrow stream"),
    (b"SQLite format 3", "an SQLite database"), (b"\x80\x02", "a pickle"),
    (b"\x80\x04", "a pickle"), (b"\x80\x05", "a pickle"), (b"LITPKDS", "a litgpt token file"),
)  # fmt: skip

_SNIFF_BYTES = 8192
_DATASET_MARKERS = ("dataset_dict.json", "state.json")


@dataclasses.dataclass(frozen=True)
class DataFile:
    """One file to read, and its format.

    The format is one of `text`, `jsonl`, `json`, `csv`, `tsv`, `parquet`, `tokens`, or
    `datasets` (then `path` is a `save_to_disk` folder).
    """

    path: Path
    kind: str


def not_text(head: bytes) -> str | None:
    """What the first bytes of a file show it to be when that is not text; None for text."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if b"\0" in head:
        return "binary (it has NUL bytes)"
    return None


def compressed(path: Path) -> bool:
    """Whether `path` is named as gzip-compressed (`corpus.jsonl.gz`)."""
    return path.suffix.lower() == ".gz"


def kind_of(path: Path) -> str:
    """The format a file's name says: its suffix, or for `x.jsonl.gz` the one before `.gz`."""
    suffix = Path(path.stem).suffix if compressed(path) else path.suffix
    return SUFFIXES.get(suffix.lower(), "text")


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when its name ends in `.gz`."""
    return gzip.open(path, "rb") if compressed(path) else open(path, "rb")  # noqa: SIM115


def _head(path: Path) -> bytes:
    with open_binary(path) as f:
        return f.read(_SNIFF_BYTES)


def problem(path: Path, kind: str) -> str | None:
    """Why a file of format `kind` cannot be read, judged by its first bytes; None if it can."""
    if compressed(path) and kind in ("tokens", "parquet", "arrow"):
        return f"a compressed {kind} file, which is read only uncompressed"
    if kind == "tokens":
        return None
    try:
        head = _head(path)
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises all three for a bad file
        return f"a gzip file that cannot be read ({exc})"
    if kind == "parquet":
        return None if head.startswith(b"PAR1") else "not a Parquet file (no PAR1 magic number)"
    if kind == "arrow":
        arrow = head.startswith((b"ARROW1", b"\xff\xff\xff\xff"))
        return None if arrow else "not an Arrow file (no Arrow stream or file header)"
    what = not_text(head)
    return None if what is None else f"{what}, not text"


def classify(path: Path) -> DataFile:
    """The format of one file, by its suffix, checked against its first bytes.

    Raises:
        DataError: If the file is not in a format amptrain reads; the message names the file,
            what it looks like, and the supported formats.
    """
    kind = kind_of(path)
    why = problem(path, kind)
    if why is not None:
        raise DataError(f"--data {path} is {why}; amptrain reads {SUPPORTED}")
    return DataFile(path, kind)


def is_dataset_folder(path: Path) -> bool:
    """Whether `path` is a folder written by `datasets`' `save_to_disk`."""
    return path.is_dir() and any((path / name).is_file() for name in _DATASET_MARKERS)


def resolve(source: str | Path) -> list[DataFile]:
    """The files of a `--data` path and their formats; a folder's unusable files are skipped.

    Raises:
        FileNotFoundError: If the path does not exist.
        DataError: For a file in no supported format, or a folder with nothing to read.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if path.is_file():
        return [classify(path)]
    if is_dataset_folder(path):
        return [DataFile(path, "datasets")]
    return _folder(path)


def _folder(path: Path) -> list[DataFile]:
    """The readable files under a folder, sorted; hidden files and folders are left out."""
    found, skipped = [], []
    for p in sorted(path.rglob("*")):
        parts = p.relative_to(path).parts
        if not p.is_file() or any(part.startswith(".") for part in parts):
            continue
        why = _not_in_folder(p, path)
        if why is None:
            found.append(DataFile(p, kind_of(p)))
        else:
            skipped.append((p, why))
    for p, why in skipped[:10]:
        log.info("skipped %s: %s", p, why)
    if len(skipped) > 10:
        log.info("skipped %d more files under %s that cannot be read", len(skipped) - 10, path)
    if not found:
        raise DataError(f"no text files under {path} ({len(skipped)} skipped); it reads "
                        f"{SUPPORTED}")  # fmt: skip
    return found


def _not_in_folder(p: Path, root: Path) -> str | None:
    """Why a folder's file is skipped: empty, unreadable, a token file, in a datasets folder."""
    inside = next((d for d in p.parents if d != root and is_dataset_folder(d)), None)
    if inside is not None and root in inside.parents:
        return f"part of the datasets folder {inside}: pass that folder alone as --data"
    if p.stat().st_size == 0:
        return "empty"
    kind = kind_of(p)
    if kind == "tokens" and not compressed(p):
        return "a token file: pass it alone as --data"
    return problem(p, kind)
