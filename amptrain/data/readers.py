"""Read the text of one data file, a piece at a time, whatever its format.

Every reader yields pieces whose concatenation is the file's text: a text file's own bytes,
or the `--text-field` of each record, records joined by a newline. Pieces are about 1 MB, so
a large file is never held whole (a `.json` file is the exception: JSON has to be parsed whole;
use JSONL for large data). Parquet needs the `data` extra (pyarrow), a `save_to_disk` folder
`datasets`.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from amptrain.data.formats import DataFile, open_binary
from amptrain.data.records import damaged_part, json_records, jsonl_records, not_utf8, unreadable
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
        "choose one with --text-field (records with a prompt and a completion, or with "
        "'messages', train as instruction or chat examples: --prompt-field, --completion-field)"
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
    for where, record in jsonl_records(path):
        text = _text_of(record, path, field, where)
        if text is not None:
            yield text


def _json(path: Path, field: str) -> Iterator[str]:
    for where, record in json_records(path):
        text = _text_of(record, path, field, where)
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

    with unreadable(path, "Parquet file"):
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if field not in names:
            raise missing_field(path, field, names)
        for batch in parquet.iter_batches(batch_size=4096, columns=[field]):
            yield from _strings(batch.column(0).to_pylist(), path, field)


def _arrow(path: Path, field: str) -> Iterator[str]:
    """An Arrow IPC file or stream (the `.arrow` files `datasets` caches), memory-mapped."""
    from amptrain._imports import requires

    requires("pyarrow", "data", f"--data {path}", "convert it to JSONL")
    import pyarrow as pa

    with unreadable(path, "Arrow file"), pa.memory_map(str(path)) as source:
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

    damaged = functools.partial(damaged_part, path)
    with unreadable(path, "datasets folder", damaged):
        loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        if "train" not in loaded and len(splits) != 1:
            raise DataError(f"{path} holds the splits {splits} and no 'train' split; pass "
                            "one split's folder as --data")  # fmt: skip
        loaded = loaded["train" if "train" in loaded else splits[0]]
    if field not in loaded.column_names:
        raise missing_field(path, field, loaded.column_names)
    with unreadable(path, "datasets folder", damaged):
        for batch in loaded.select_columns([field]).iter(batch_size=4096):
            yield from _strings(batch[field], path, field)
