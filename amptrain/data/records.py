"""The records of a data file, whatever its format, and the one-line errors of a damaged one.

A record is what a file holds: a JSON value for JSONL and JSON, a dict of the columns for
CSV/TSV, Parquet, Arrow and `datasets` folders. `readers` takes the text field of each;
`examples` takes the prompt and completion, or the chat turns.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from amptrain.data.formats import DataFile, open_binary
from amptrain.errors import DataError


def not_utf8(path: Path, where: str | None, exc: UnicodeDecodeError) -> DataError:
    """The error for text that is not UTF-8: the file, where, the byte; never replaced."""
    byte = exc.object[exc.start : exc.start + 1].hex()
    at = f" at {where}" if where else ""
    return DataError(f"{path} is not UTF-8{at} (byte 0x{byte}: {exc.reason}); save the file "
                     "as UTF-8 (e.g. iconv -f latin1 -t utf-8)")  # fmt: skip


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """`(" line N", record)` for each non-blank line of a JSONL file."""
    with open_binary(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not JSON ({exc.msg}); JSONL needs "
                                "one JSON record per line") from None  # fmt: skip
            except RecursionError:
                raise DataError(
                    f"{path} line {number} is JSON nested deeper than Python reads; a record "
                    "is an object with a text field"
                ) from None
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} line {number} is not UTF-8 ({exc.reason} at byte "
                                f"{exc.start}); save the file as UTF-8") from None  # fmt: skip
            yield f" line {number}", record


def json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """`(" item N", record)` for each item of a `.json` file's list."""
    with open_binary(path) as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not JSON ({exc.msg} at line {exc.lineno}); for one "
                            "record per line name it .jsonl") from None  # fmt: skip
        except RecursionError:
            raise DataError(f"{path} is JSON nested deeper than Python reads; a .json data "
                            "file is a list of records or of strings") from None  # fmt: skip
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 ({exc.reason} at byte {exc.start}); save it "
                            "as UTF-8") from None  # fmt: skip
    if not isinstance(records, list):
        raise DataError(f"{path} holds a JSON {type(records).__name__}; a .json data file "
                        "must be a list of records or of strings")  # fmt: skip
    for i, record in enumerate(records):
        yield f" item {i}", record


def records(file: DataFile) -> Iterator[tuple[str, Any]]:
    """`(where, record)` for each record of a data file of records, `where` naming its place.

    A record is what the file holds: a JSON value for JSONL/JSON, a dict of the columns for
    CSV/TSV, Parquet, Arrow and `datasets` folders.

    Raises:
        DataError: For a file of plain text or token ids, which holds no records.
    """
    if file.kind in ("jsonl", "json"):
        yield from (jsonl_records if file.kind == "jsonl" else json_records)(file.path)
    elif file.kind in ("csv", "tsv"):
        yield from _csv_rows(file.path)
    elif file.kind in ("parquet", "arrow", "datasets"):
        yield from _table_rows(file)
    else:
        raise DataError(f"{file.path} holds {file.kind}, not records")


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(max(csv.field_size_limit(), sys.maxsize >> 33))
    delimiter = "\t" if path.name.lower().endswith((".tsv", ".tsv.gz")) else ","
    with io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="") as f:
        try:
            for number, row in enumerate(csv.DictReader(f, delimiter=delimiter), 2):
                yield f" line {number}", row
        except UnicodeDecodeError as exc:
            raise not_utf8(path, None, exc) from None


def _table_rows(file: DataFile) -> Iterator[tuple[str, Any]]:
    """The rows of a Parquet or Arrow file or a `datasets` folder, as dicts."""
    from amptrain._imports import requires

    requires("pyarrow", "data", f"--data {file.path}", "convert it to JSONL")
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    what = {"parquet": "Parquet file", "arrow": "Arrow file"}.get(file.kind, "datasets folder")
    find = functools.partial(damaged_part, file.path) if file.kind == "datasets" else None
    with unreadable(file.path, what, find):
        if file.kind == "parquet":
            batches = pq.ParquetFile(file.path).iter_batches(batch_size=1024)
        elif file.kind == "arrow":
            source = pa.memory_map(str(file.path))
            is_file = source.read(6) == b"ARROW1"
            source.seek(0)
            reader = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
            batches = iter(reader.read_all().to_batches())
        else:
            requires("datasets", "data", f"--data {file.path} (a save_to_disk folder)")
            import datasets

            loaded = datasets.load_from_disk(str(file.path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded["train" if "train" in loaded else sorted(loaded)[0]]
            batches = iter(loaded.data.to_batches())
        for batch in batches:
            for values in batch.to_pylist():
                yield f" row {row}", values
                row += 1


@contextlib.contextmanager
def unreadable(
    path: Path, what: str, find: Callable[[], Path | None] | None = None
) -> Iterator[None]:
    """A damaged file's error from pyarrow or datasets, as one line naming the file.

    `find`, called only on an error, names the damaged file inside the folder `path`.
    """
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        part = find() if find else None
        if part is not None:
            raise DataError(f"{part}, a file of the {what} {path}, cannot be read ({reason}): "
                            "it is damaged or cut short; save the data again, or leave it out "
                            "of --data") from None  # fmt: skip
        raise DataError(f"{path} is not a readable {what} ({reason}): it is damaged or cut "
                        "short; write it again, or leave it out of --data") from None  # fmt: skip


def damaged_part(folder: Path) -> Path | None:
    """The first file of a `save_to_disk` folder that does not read whole, or None.

    Its JSON files must parse and its Arrow files hold every record batch they announce; this
    runs only once loading has failed, to name the file rather than the folder.
    """
    import pyarrow as pa

    for part in sorted(folder.rglob("*")):
        try:
            if part.suffix == ".json":
                json.loads(part.read_text(encoding="utf-8"))
            elif part.suffix == ".arrow":
                with pa.memory_map(str(part)) as source:
                    for _ in pa.ipc.open_stream(source):  # each batch mapped, none kept
                        pass
        except (pa.ArrowException, OSError, ValueError):
            return part
    return None
