"""Bad input is refused before work, in one line with exit code 2, within seconds: a context
the model or the memory cannot take, a model file without a name, labels already shifted."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

import amptrain
from amptrain.cli import main
from amptrain.errors import DataError, ModelError
from amptrain.models import ModelSpec, build_model


def _refused(capsys, *argv):
    """The command exits 2 with one error line (log lines before it are not the error)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = [x for x in err.splitlines() if x.startswith("amptrain: error:")]
    assert err.rstrip().endswith(line)  # the error is the last thing said, and one line
    return line


def test_a_context_beyond_memory_is_refused_with_the_numbers(tmp_path, capsys):
    err = _refused(capsys, "train", "--context", "100000", "--batch-size", "64", "--max-steps",
                   "5", "--out", str(tmp_path), "--no-progress")  # fmt: skip
    assert "context 100000 with batch size 64 needs at least" in err
    assert "GiB available; lower --context (at most about" in err


@pytest.mark.slow
def test_the_reported_command_fails_fast_in_a_fresh_process(tmp_path):
    cmd = [sys.executable, "-m", "amptrain", "train", "--context", "1000000", "--max-steps", "5",
           "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "context 1000000" in proc.stderr


def test_a_context_beyond_the_models_positions_is_refused(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2)  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    err = _refused(capsys, "train", "--model", str(tmp_path / "gpt2"), "--context", "32",
                   "--out", str(tmp_path), "--no-progress")  # fmt: skip
    assert "context 32 is longer than the 16 positions" in err and "--context to 16" in err


MODEL_FILE = """
from torch import nn

class Net(nn.Module):
    def __init__(self, vocab_size, width=8):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, width)

def make(**config):
    net = Net(config["vocab_size"], config.get("width", 8))
    net.seen = dict(config)
    return net

def make_strict(**config):
    return nn.Embedding(**config)

def _private():
    pass
"""


def test_a_model_file_without_a_name_lists_its_candidates(tmp_path, capsys):
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL_FILE)
    err = _refused(capsys, "train", "--model", str(path), "--out", str(tmp_path))
    assert f"use {path}:Name, where Name is one of: Net, make, make_strict" in err


def test_vocab_size_reaches_a_kwargs_constructor_unless_it_refuses_it(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL_FILE)
    model = build_model(ModelSpec(f"{path}:make", {"width": 4}), 48)
    assert model.seen == {"width": 4, "vocab_size": 48}
    strict = build_model(ModelSpec(f"{path}:make_strict",
                                   {"num_embeddings": 5, "embedding_dim": 2}), 48)  # fmt: skip
    assert strict.num_embeddings == 5  # nn.Embedding takes no vocab_size: called without


def test_labels_already_shifted_are_refused_or_taken_when_said(train_val):
    ids = train_val[0].inputs
    x, y = ids[:, :-1], ids[:, 1:]  # nanoGPT's get_batch pairs
    with pytest.raises(DataError, match=r"labels are the input_ids shifted left by one.*"
                                        r"labels_shifted=True"):  # fmt: skip
        amptrain.fit(tiny_model(), {"input_ids": x, "labels": y}, max_steps=1, batch_size=4)
    result = amptrain.fit(tiny_model(), {"input_ids": x, "labels": y}, max_steps=1,
                          batch_size=4, labels_shifted=True)  # fmt: skip
    aligned = amptrain.fit(tiny_model(), {"input_ids": x, "labels": x}, max_steps=1, batch_size=4)
    assert result.final_train_loss == aligned.final_train_loss  # the same task, minus nothing


def test_a_forward_that_returns_the_last_position_only_is_explained(tmp_path):
    path = tmp_path / "last.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Last(nn.Module):\n"
        "    def __init__(self, vocab_size):\n"
        "        super().__init__()\n"
        "        self.emb = nn.Embedding(vocab_size, vocab_size)\n\n"
        "    def forward(self, idx, y=None):\n"
        "        return self.emb(idx)[:, [-1], :]\n"
    )
    spec = f"{path}:Last"
    with pytest.raises(ModelError, match=r"shape \[1, 1, 32\] for input \[1, 16\].*nanoGPT's.*"
                                         r"`targets` parameter"):  # fmt: skip
        amptrain.fit(build_model(ModelSpec(spec), 32), torch.zeros(8, 16, dtype=torch.long),
                     source=spec, max_steps=1, batch_size=4)  # fmt: skip
