"""Read the text of one data file, a piece at a time, whatever its format.

Every reader yields pieces whose concatenation is the file's text: a text file's own bytes,
or the `--text-field` of each record, records joined by a newline. Pieces are about 1 MB, so
a large file is never held whole (a `.json` file is the exception: JSON has to be parsed whole;
use JSONL for large data). Parquet needs the `data` extra (pyarrow), a `save_to_disk` folder
`datasets`.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from amptrain.data.formats import DataFile, open_binary
from amptrain.errors import DataError

PIECE = 1 << 20  # characters (or bytes) per piece


def pieces(file: DataFile, text_field: str, raw: bool) -> Iterator[str | bytes]:
    """The text of `file` in pieces; with `raw`, a text file's pieces are its undecoded bytes."""
    if file.kind == "text":
        return _text(file.path, raw)
    records = {"jsonl": _jsonl, "json": _json, "csv": _csv, "tsv": _csv,
               "parquet": _parquet, "arrow": _arrow, "datasets": _datasets}[file.kind]  # fmt: skip
    return _joined(records(file.path, text_field))


def _text(path: Path, raw: bool) -> Iterator[str | bytes]:
    """Byte pieces (`raw`: byte tokens take any bytes), else UTF-8 text, never replaced."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open_binary(path) as f:
        while chunk := f.read(PIECE):
            if raw:
                yield chunk
                continue
            try:
                yield decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise not_utf8(path, f"byte {offset + exc.start}", exc) from None
            offset += len(chunk)
    if not raw:
        try:
            yield decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise not_utf8(path, "its end", exc) from None


def not_utf8(path: Path, where: str | None, exc: UnicodeDecodeError) -> DataError:
    """The error for text that is not UTF-8: the file, where, the byte; never replaced."""
    byte = exc.object[exc.start : exc.start + 1].hex()
    at = f" at {where}" if where else ""
    return DataError(f"{path} is not UTF-8{at} (byte 0x{byte}: {exc.reason}); save the file "
                     "as UTF-8 (e.g. iconv -f latin1 -t utf-8)")  # fmt: skip


def _joined(texts: Iterable[str]) -> Iterator[str]:
    """Documents joined by newlines, in pieces of about `PIECE` characters."""
    batch, size, first = [], 0, True
    for text in texts:
        batch.append(text)
        size += len(text) + 1
        if size >= PIECE:
            yield ("" if first else "\n") + "\n".join(batch)
            batch, size, first = [], 0, False
    if batch:
        yield ("" if first else "\n") + "\n".join(batch)


def missing_field(path: Path, field: str, fields: Iterable[str], where: str = "") -> DataError:
    """The error for a record without the text field: the file, the field, the fields there."""
    return DataError(
        f"{path}{where} has no text field {field!r}; its fields are {sorted(fields)}; "
        "choose one with --text-field"
    )


def _text_of(record: Any, path: Path, field: str, where: str) -> str | None:
    """The text of one JSON record (a string, or an object holding the field)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{path}{where} is a JSON {type(record).__name__}, not a record (an "
                        "object with a text field) or a string")  # fmt: skip
    if field not in record:
        raise missing_field(path, field, record, where)
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{path}{where}: field {field!r} is a {type(value).__name__}, not "
                        "text; choose a text field with --text-field")  # fmt: skip
    return value


def _jsonl(path: Path, field: str) -> Iterator[str]:
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
            text = _text_of(record, path, field, f" line {number}")
            if text is not None:
                yield text


def _json(path: Path, field: str) -> Iterator[str]:
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
        text = _text_of(record, path, field, f" item {i}")
        if text is not None:
            yield text


def _csv(path: Path, field: str) -> Iterator[str]:
    csv.field_size_limit(max(csv.field_size_limit(), sys.maxsize >> 33))  # long documents
    delimiter = "\t" if path.name.lower().endswith((".tsv", ".tsv.gz")) else ","
    binary = open_binary(path)
    # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first field's name.
    with io.TextIOWrapper(binary, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            if field not in (reader.fieldnames or []):
                raise missing_field(path, field, reader.fieldnames or [], " (header)")
            for row in reader:
                if row[field]:
                    yield row[field]
        except UnicodeDecodeError as exc:  # a latin-1 export, say: refused, not replaced
            raise not_utf8(path, None, exc) from None


def _parquet(path: Path, field: str) -> Iterator[str]:
    from amptrain._imports import requires

    requires("pyarrow", "data", f"--data {path}", "convert it to JSONL")
    import pyarrow.parquet as pq

    with _unreadable(path, "Parquet file"):
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if field not in names:
            raise missing_field(path, field, names)
        for batch in parquet.iter_batches(batch_size=4096, columns=[field]):
            yield from _strings(batch.column(0).to_pylist(), path, field)


@contextlib.contextmanager
def _unreadable(
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


def _arrow(path: Path, field: str) -> Iterator[str]:
    """An Arrow IPC file or stream (the `.arrow` files `datasets` caches), memory-mapped."""
    from amptrain._imports import requires

    requires("pyarrow", "data", f"--data {path}", "convert it to JSONL")
    import pyarrow as pa

    with _unreadable(path, "Arrow file"), pa.memory_map(str(path)) as source:
        is_file = source.read(6) == b"ARROW1"
        source.seek(0)
        reader = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
        if field not in reader.schema.names:
            raise missing_field(path, field, reader.schema.names)
        column = reader.schema.get_field_index(field)
        if is_file:
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for batch in batches:
            yield from _strings(batch.column(column).to_pylist(), path, field)


def _strings(values: list[Any], path: Path, field: str) -> Iterator[str]:
    for value in values:
        if isinstance(value, str):
            yield value
        elif value is not None:
            raise DataError(f"{path}: column {field!r} holds {type(value).__name__} values, "
                            "not text; choose a text column with --text-field")  # fmt: skip


def _datasets(path: Path, field: str) -> Iterator[str]:
    from amptrain._imports import requires

    requires("datasets", "data", f"--data {path} (a save_to_disk folder)")
    import datasets

    damaged = functools.partial(_damaged_part, path)
    with _unreadable(path, "datasets folder", damaged):
        loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        if "train" not in loaded and len(splits) != 1:
            raise DataError(f"{path} holds the splits {splits} and no 'train' split; pass "
                            "one split's folder as --data")  # fmt: skip
        loaded = loaded["train" if "train" in loaded else splits[0]]
    if field not in loaded.column_names:
        raise missing_field(path, field, loaded.column_names)
    with _unreadable(path, "datasets folder", damaged):
        for batch in loaded.select_columns([field]).iter(batch_size=4096):
            yield from _strings(batch[field], path, field)


def _damaged_part(folder: Path) -> Path | None:
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
