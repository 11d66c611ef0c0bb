"""The README's Python data sentences, run as written: `data.load(PATH, context=...)` then
`data.split(blocks, val_fraction=0.1, seed=0)`, where blocks may also be "a [N, T] LongTensor, or
lists of ids", and `data.load(..., tokenizer="tokenizer.json")` (a path, not only an object)."""

from __future__ import annotations

import pytest
import torch
from conftest import word_tokenizer

from amptrain import data
from amptrain.errors import DataError


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_corpus").mkdir()
    (tmp_path / "my_corpus" / "a.txt").write_text("the quick brown fox jumps over it. " * 40)
    return tmp_path


def test_load_a_folder_then_split_as_the_readme_does(corpus_dir):
    blocks = data.load("my_corpus/", context=128)
    train, val = data.split(blocks, val_fraction=0.1, seed=0)
    assert len(train) + len(val) == len(blocks) and len(val) == round(len(blocks) * 0.1)
    assert train.context == val.context == 128


@pytest.mark.parametrize("given", [
    torch.randint(0, 256, (20, 16)),                          # a [N, T] LongTensor
    [[1, 2, 3, 4], [5, 6, 7]] * 10,                           # lists of ids
    {"input_ids": torch.randint(0, 256, (20, 16))},           # a dict of input_ids
])  # fmt: skip
def test_split_takes_a_tensor_or_lists_of_ids(given):
    train, val = data.split(given, val_fraction=0.1, seed=0)
    assert (len(train), len(val)) == (18, 2)
    again = data.split(given, val_fraction=0.1, seed=0)
    assert torch.equal(train.inputs, again[0].inputs)  # seeded


def test_split_refuses_a_fraction_outside_zero_and_one():
    with pytest.raises(ValueError, match=r"val_fraction=1\.5 must be between 0 and 1"):
        data.split(torch.zeros(4, 8, dtype=torch.long), val_fraction=1.5)
    with pytest.raises(DataError, match="need at least 2"):
        data.split(torch.zeros(1, 8, dtype=torch.long))


def test_load_takes_the_path_of_a_tokenizer_json(corpus_dir):
    words = ["<unk>", "the", "quick", "brown", "fox"]
    word_tokenizer(corpus_dir / "tokenizer.json", words)
    blocks = data.load("my_corpus/", context=4, tokenizer="tokenizer.json")
    assert blocks.inputs[0].tolist() == [1, 2, 3, 4]  # words, not bytes
    assert int(blocks.store.max()) < len(words)
