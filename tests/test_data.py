from __future__ import annotations

import itertools

import pytest
import torch
from conftest import word_tokenizer

from amptrain import data
from amptrain.errors import DataError


def test_builtin_corpus_is_real_stdlib_text():
    files = data.builtin_corpus_files()
    assert [f.name for f in files][:2] == ["argparse.py", "__init__.py"]
    blocks = data.load("builtin", 64)
    assert len(blocks) > 10_000
    assert blocks.inputs.max() < 256
    assert bytes(blocks.inputs[0].tolist()) == files[0].read_bytes()[:64]
    corpus = b"\n".join(f.read_bytes() for f in files)  # the files joined by a newline
    assert bytes(blocks.inputs.flatten().tolist()) == corpus[: blocks.inputs.numel()]


def test_text_folder_skips_binary_and_hidden_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "b.bin").write_bytes(b"\0\1\2" * 100)
    (tmp_path / ".hidden").write_text("secret " * 50)
    assert data.text_files(tmp_path) == [tmp_path / "a.txt"]
    assert len(data.load(tmp_path, 16)) == 240 // 16


def test_empty_and_too_short_corpora_fail_clearly(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        data.load(empty, 16)
    short = tmp_path / "short.txt"
    short.write_text("x" * 20)
    with pytest.raises(DataError, match=r"20 tokens.*context 16.*lower --context"):
        data.load(short, 16)
    with pytest.raises(FileNotFoundError, match="nope"):
        data.load(tmp_path / "nope", 16)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.randn(4, 8), TypeError, "integer tensor, got dtype torch.float32"),
        (torch.zeros(4, 8, dtype=torch.complex64), TypeError, "complex64"),
        (torch.zeros(0, 8, dtype=torch.long), DataError, "is empty"),
        ({"ids": torch.zeros(2, 4)}, DataError, "'input_ids' key"),
        (
            {
                "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "labels": torch.zeros(2, 5, dtype=torch.long),
            },
            DataError,
            "labels shape",
        ),
        (torch.zeros(2, 2, 2, dtype=torch.long), DataError, r"\[N, T\]"),
        ("text", TypeError, "got str"),
    ],
)
def test_malformed_python_data_is_refused(bad, error, match):
    with pytest.raises(error, match=match):
        data.as_blocks(bad, context=4)


def test_ragged_lists_are_padded_and_masked():
    blocks = data.as_blocks([[1, 2, 3], [4, 5]])
    assert blocks.inputs.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert blocks.labels.tolist() == [[1, 2, 3], [4, 5, -100]]


def test_split_is_seeded_and_disjoint():
    blocks = data.as_blocks(torch.arange(200).view(20, 10))
    train, val = data.split(blocks, 0.25, seed=3)
    again, _ = data.split(blocks, 0.25, seed=3)
    other, _ = data.split(blocks, 0.25, seed=4)
    assert len(train) == 15 and len(val) == 5
    assert torch.equal(train.inputs, again.inputs)
    assert not torch.equal(train.inputs, other.inputs)
    rows = {tuple(r) for r in train.inputs.tolist()} | {tuple(r) for r in val.inputs.tolist()}
    assert len(rows) == 20


def test_batches_resume_at_any_position_without_replay():
    blocks = data.as_blocks(torch.arange(110).view(11, 10))
    full = [x for x, _ in itertools.islice(data.batches(blocks, 3, seed=1), 12)]
    resumed = [x for x, _ in itertools.islice(data.batches(blocks, 3, seed=1, start=5), 7)]
    assert all(torch.equal(a, b) for a, b in zip(full[5:], resumed))
    # epochs differ in order, each epoch drops the 2 leftover blocks (11 = 3*3 + 2)
    assert not torch.equal(full[0], full[3])


def test_batch_larger_than_data_is_refused():
    blocks = data.as_blocks(torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(DataError, match=r"batch_size=8 x 1 process\(es\) is larger than the 4"):
        next(data.batches(blocks, 8, seed=0))


def test_tokenizer_json_encodes_the_text(tmp_path):
    word_tokenizer(tmp_path / "tokenizer.json", ["<unk>", "the", "quick", "brown", "fox"])
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("the quick brown fox jumps " * 8)
    tokenizer = data.JsonTokenizer(tmp_path / "tokenizer.json")
    blocks = data.load(tmp_path / "text", 4, tokenizer)
    assert tokenizer.vocab_size == 5
    assert blocks.inputs[0].tolist() == [1, 2, 3, 4]
    assert blocks.inputs[1].tolist() == [0, 1, 2, 3]  # "jumps" is unknown
