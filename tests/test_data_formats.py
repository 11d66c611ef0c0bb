"""Data formats: real files made here in each format are trained on, or refused in one line.

Each format's text must come out as the same tokens as the plain text it holds, so a format read
as raw bytes (keys, quotes, compressed pages) cannot pass.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from amptrain import data
from amptrain.cli import main
from amptrain.errors import DataError

DOCS = [f"document {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(12)]
JOINED = "\n".join(DOCS).encode("utf-8")  # what every record format must read as
CONTEXT = 16


def _expected(context: int = CONTEXT) -> torch.Tensor:
    ids = torch.tensor(list(JOINED), dtype=torch.long)
    n = len(ids) // context
    return ids[: n * context].view(n, context)


def _jsonl(path):
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCS)))
    return path


def _table(path, delimiter):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["id", "text"])
        writer.writerows([i, d] for i, d in enumerate(DOCS))
    return path


def _write(kind: str, tmp_path):
    if kind == "jsonl":
        return _jsonl(tmp_path / "corpus.jsonl")
    if kind == "json-records":
        path = tmp_path / "corpus.json"
        path.write_text(json.dumps([{"text": d, "n": 1} for d in DOCS]))
        return path
    if kind == "json-strings":
        path = tmp_path / "strings.json"
        path.write_text(json.dumps(DOCS))
        return path
    if kind in ("jsonl.gz", "tsv.gz", "txt.gz"):
        plain = tmp_path / "plain"
        plain.mkdir(exist_ok=True)
        inner = JOINED if kind == "txt.gz" else _write(kind[:-3], plain).read_bytes()
        path = tmp_path / f"corpus.{kind}"
        path.write_bytes(gzip.compress(inner))
        return path
    if kind in ("csv", "tsv"):
        return _table(tmp_path / f"corpus.{kind}", "," if kind == "csv" else "\t")
    if kind == "parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        path = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), path)
        return path
    if kind in ("arrow-stream", "arrow-file"):
        pa = pytest.importorskip("pyarrow")
        path, table = tmp_path / f"{kind}.arrow", pa.table({"text": DOCS, "id": range(len(DOCS))})
        new = pa.ipc.new_stream if kind == "arrow-stream" else pa.ipc.new_file
        with new(str(path), table.schema) as writer:
            for batch in table.to_batches(max_chunksize=5):
                writer.write_batch(batch)
        return path
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))}).save_to_disk(path)
    return path


RECORD_FORMATS = (
    "jsonl", "json-records", "json-strings", "csv", "tsv", "parquet", "datasets", "jsonl.gz",
    "tsv.gz", "txt.gz", "arrow-stream", "arrow-file",
)  # fmt: skip


@pytest.mark.parametrize("kind", RECORD_FORMATS)
def test_each_record_format_reads_as_its_text(kind, tmp_path):
    blocks = data.load(_write(kind, tmp_path), CONTEXT)
    assert torch.equal(blocks.inputs, _expected())


def test_a_dataset_dict_folder_reads_its_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": DOCS})
    other = datasets.Dataset.from_dict({"text": ["not this"] * 40})
    datasets.DatasetDict({"train": train, "test": other}).save_to_disk(tmp_path / "dd")
    assert torch.equal(data.load(tmp_path / "dd", CONTEXT).inputs, _expected())


def test_a_tokenizer_sees_the_same_text_as_the_bytes(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    words = ["<unk>", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
    tok = tokenizers.Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    tokenizer = data.JsonTokenizer(tmp_path / "tokenizer.json")
    text = tmp_path / "corpus.txt"
    text.write_bytes(JOINED)
    jsonl = data.load(_jsonl(tmp_path / "c.jsonl"), 4, tokenizer)
    assert torch.equal(jsonl.inputs, data.load(text, 4, tokenizer).inputs)
    assert jsonl.store.dtype == torch.uint8  # a 9-word vocabulary: one byte an id


def _nanogpt_bin(path, ids, dtype=np.uint16):
    """As nanoGPT's prepare.py writes train.bin: the ids as a flat array, no header."""
    np.array(ids, dtype=dtype).tofile(path)
    return path


def test_a_nanogpt_uint16_bin_is_memory_mapped_token_ids(tmp_path, monkeypatch):
    from amptrain.data import tokens

    ids = (np.arange(4000) * 7919 % 50257).tolist()  # GPT-2 sized ids
    path = _nanogpt_bin(tmp_path / "train.bin", ids)
    opened, real = [], tokens.open_token_file
    monkeypatch.setattr(tokens, "open_token_file", lambda *a: opened.append(real(*a)) or opened[-1])
    blocks = data.load(path, 64)
    (mapping,) = opened
    assert isinstance(mapping, np.memmap) and Path(mapping.filename) == path.resolve()
    assert blocks.store.data_ptr() == mapping.ctypes.data  # the mapping itself, not a copy
    assert blocks.store.dtype == torch.uint16
    assert blocks.max_id == max(ids) and len(blocks) == 4000 // 64
    assert blocks.inputs[1].tolist() == ids[64:128]
    x, y = blocks.take(torch.tensor([2]))
    assert x.dtype == torch.long and x[0].tolist() == ids[128:192] and torch.equal(x, y)
    assert path.read_bytes() == np.array(ids, dtype=np.uint16).tobytes()  # never written


def test_bin_dtype_is_stated_and_a_wrong_width_refused(tmp_path):
    ids = list(range(1, 3000))
    wide = _nanogpt_bin(tmp_path / "wide.bin", ids, np.uint32)
    with pytest.raises(DataError, match=r"holds uint32 ids; pass --data-dtype uint32"):
        data.load(wide, 16)
    assert data.load(wide, 16, data_dtype="uint32").inputs.flatten().tolist() == ids[:2992]
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\1\0" * 501)
    with pytest.raises(DataError, match=r"1,002 bytes, not a whole number of uint32"):
        data.load(odd, 16, data_dtype="uint32")


def test_a_litgpt_packed_file_states_its_own_dtype(tmp_path):
    import struct

    ids = np.arange(2048, dtype=np.int32) * 31 + 70_000
    path = tmp_path / "packed.bin"
    path.write_bytes(b"LITPKDS" + struct.pack("<Q", 1) + struct.pack("<B", 4)
                     + struct.pack("<Q", 2048) + ids.tobytes())  # fmt: skip
    blocks = data.load(path, 32)  # the default uint16 is overridden by the header
    assert blocks.inputs.flatten().tolist() == ids.tolist() and blocks.max_id == int(ids.max())


def _refused(args, tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["train", *args, "--context", str(CONTEXT), "--max-steps", "1",
                 "--out", str(out), "--no-progress", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert code == 2 and len(said) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return said[0]


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("corpus.txt", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, "a gzip file"),
        ("notes.txt", b"hello\0world" * 50, "NUL bytes"),
        ("model", b"\x7fELF\x02\x01\x01" + b"\0" * 300, "an ELF executable"),
        ("picture.txt", b"\x89PNG\r\n\x1a\n" + b"\0" * 300, "a PNG image"),
        ("archive.txt", b"PK\x03\x04" + b"\1" * 300, "a zip file"),
        ("corpus.jsonl", b"PAR1" + b"\1" * 300, "a Parquet file"),
        ("fake.parquet", b"just text, no magic " * 20, "no PAR1 magic"),
    ],
)
def test_a_file_that_is_not_text_is_refused_before_a_run_directory(
    name, content, what, tmp_path, capsys
):
    path = tmp_path / name
    path.write_bytes(content)
    line = _refused(["--data", str(path)], tmp_path, capsys)
    assert str(path) in line and what in line and "JSONL (.jsonl)" in line


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "arrow-stream", "datasets"])
def test_a_missing_text_field_names_the_file_the_field_and_the_fields_there(kind, tmp_path, capsys):
    path = _write(kind, tmp_path)
    line = _refused(["--data", str(path), "--text-field", "body"], tmp_path, capsys)
    assert str(path) in line and "'body'" in line and "'id'" in line and "'text'" in line
    assert "--text-field" in line


def test_bin_ids_beyond_the_model_vocabulary_are_refused_by_name(tmp_path, capsys):
    path = _nanogpt_bin(tmp_path / "train.bin", (np.arange(3000) % 1000).tolist())
    line = _refused(["--data", str(path), "--width", "16", "--layers", "1"], tmp_path, capsys)
    assert "token id 999" in line and "[0, 256)" in line and '"vocab_size": 1024' in line


def test_a_folder_skips_what_it_cannot_read_and_says_why(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(JOINED[:600])
    _jsonl(tmp_path / "b.jsonl")
    (tmp_path / "c.gz").write_bytes(b"\x1f\x8b\x08" + b"\0" * 100)
    _nanogpt_bin(tmp_path / "d.bin", [1, 2, 3])
    logging.getLogger("amptrain").propagate = True
    with caplog.at_level(logging.INFO, logger="amptrain"):
        blocks = data.load(tmp_path, CONTEXT)
    said = [r.getMessage() for r in caplog.records]
    assert any("c.gz" in m and "gzip" in m for m in said)
    assert any("d.bin" in m and "token file" in m for m in said)
    stream = JOINED[:600] + b"\n" + JOINED
    assert blocks.inputs.flatten().tolist() == list(stream[: len(blocks) * CONTEXT])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jsonl", "bin"])
def test_train_cli_trains_on_a_jsonl_file_and_a_nanogpt_bin(kind, tmp_path, capsys):
    if kind == "jsonl":
        path, extra = _jsonl(tmp_path / "corpus.jsonl"), []
    else:
        ids = (np.arange(6000) * 13 % 500).tolist()
        path = _nanogpt_bin(tmp_path / "train.bin", ids)
        extra = ["--model-kwargs", '{"vocab_size": 512}']
    out = tmp_path / "runs"
    code = main(["train", "--data", str(path), *extra, "--context", str(CONTEXT),
                 "--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "4",
                 "--max-steps", "3", "--eval-every", "3", "--eval-batches", "1",
                 "--precision", "fp32", "--device", "cpu", "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (run,) = out.iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == str(path) and config["text_field"] == "text"
    assert config["data_dtype"] == "uint16"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"] == str(path)
    assert math.isfinite(summary["final_val_loss"])
    if kind == "jsonl":  # another command, another format, through the same loader
        table = _table(tmp_path / "other.tsv", "\t")
        code = main(["eval", "--model", str(run), "--data", str(table), "--out", str(out),
                     "--no-progress"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        (scored,) = out.glob("eval-*/eval.json")
        assert json.loads(scored.read_text())["blocks"] == len(_expected())


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("one.json", '{"text": "a whole object"}', r"holds a JSON dict; .*list of records"),
        ("bad.jsonl", '{"text": "fine"}\n{"text": broken}\n', r"line 2 is not JSON"),
        ("nums.jsonl", '{"text": 3}\n', r"field 'text' is a int, not text"),
    ],
)
def test_malformed_records_are_refused_with_where(name, content, match, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        data.load(path, CONTEXT)


def test_the_data_flags_are_in_help_with_their_defaults_and_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--text-field" in text and "(default: text)" in text
    assert "--data-dtype" in text and "(default: uint16)" in text
    line = _refused(["--data", str(_jsonl(tmp_path / "c.jsonl")), "--data-dtype", "int8"],
                    tmp_path, capsys)  # fmt: skip
    assert "data_dtype='int8'" in line and "uint16 or uint32" in line


def test_a_datasets_folder_inside_a_folder_is_skipped_whole(tmp_path, caplog):
    pytest.importorskip("datasets")
    (tmp_path / "a.txt").write_bytes(JOINED)
    _write("datasets", tmp_path)  # tmp_path/saved: state.json, dataset_info.json, .arrow
    logging.getLogger("amptrain").propagate = True
    with caplog.at_level(logging.INFO, logger="amptrain"):
        assert torch.equal(data.load(tmp_path, CONTEXT).inputs, _expected())
    assert any("state.json" in r.getMessage() and "datasets folder" in r.getMessage()
               for r in caplog.records)  # fmt: skip
