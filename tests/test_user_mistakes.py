"""Every user mistake is one line with the README's exit code, no traceback, nothing left behind."""

from __future__ import annotations

import shutil

import pytest
from conftest import rewrite_manifest_entry

from amptrain import checkpoint
from amptrain.cli import main

LOOP = ["--context", "16", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2",
        "--eval-batches", "1", "--precision", "fp32", "--no-progress"]  # fmt: skip
TINY = ["--layers", "1", "--width", "16", "--heads", "2", *LOOP]

MODELS = """
import torch
from torch import nn


class NoParameters(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, idx):
        return nn.functional.one_hot(idx, self.vocab_size).float()


class Frozen(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, vocab_size).requires_grad_(False)

    def forward(self, idx):
        return self.emb(idx)


class Narrow(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(8, 7)

    def forward(self, idx):
        return self.head(self.emb(idx))


class Transposed(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx):
        return self.emb(idx).transpose(1, 2)
"""


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


def refused(capsys, argv, out=None, code=2):
    """Run `argv`; assert the exit code, one `amptrain:` line last, no traceback, no `out`
    (None: a resume, whose run exists)."""
    got = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("amptrain:")]
    assert err.rstrip().endswith(line)
    assert out is None or not out.exists() or out.is_file()
    return line


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("NoParameters", "has no trainable floating-point parameters (0 parameter"),
        ("Frozen", "has no trainable floating-point parameters (1 parameter"),
        ("Narrow", "outside the model's vocabulary [0, 7)"),
        ("Transposed", "returned logits of shape [1, 256, 16] for input [1, 16]"),
    ],
)
def test_a_model_that_cannot_train_is_refused_before_the_run_directory(
    name, said, tmp_path, corpus, models, capsys
):
    out = tmp_path / "runs"
    line = refused(capsys, ["train", "--model", f"{models}:{name}", "--data", corpus,
                            "--out", out, *LOOP], out)  # fmt: skip
    assert said in line


def test_more_batch_than_training_blocks_is_refused_before_the_run_directory(
    tmp_path, corpus, capsys
):
    out = tmp_path / "runs"
    line = refused(capsys, ["train", "--data", corpus, "--out", out, *TINY,
                            "--batch-size", "1000"], out)  # fmt: skip
    assert "batch_size=1000 x 1 process(es) is larger than the" in line
    assert "lower --batch-size" in line


def test_out_naming_a_file_is_exit_2(tmp_path, corpus, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    line = refused(capsys, ["train", "--data", corpus, "--out", out, *TINY], out)
    assert f"{out} is a file, not a folder" in line
    line = refused(capsys, ["train", "--data", corpus, "--out", out / "runs", *TINY], out)
    assert f"{out} is a file, not a folder" in line
    assert out.read_text() == "mine"


@pytest.fixture
def run_with_checkpoints(tmp_path, corpus, monkeypatch):
    """A 4-step run checkpointed at every step (the newest three kept)."""
    monkeypatch.setattr("amptrain.train.MATPLOTLIB_AVAILABLE", False)
    out = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--max-steps", "4",
                 "--checkpoint-every", "1"]) == 0  # fmt: skip
    (run,) = out.iterdir()
    return out, run


@pytest.mark.parametrize("payload", [b"hello\n", b"\x80\x02}q\x00.", bytes(range(256)) * 8])
def test_a_newest_checkpoint_of_garbage_with_a_matching_manifest_falls_back(
    run_with_checkpoints, capsys, payload
):
    out, run = run_with_checkpoints
    newest = run / "checkpoints" / f"step-{4:09d}"
    (newest / "model.pt").write_bytes(payload)
    rewrite_manifest_entry(newest, "model.pt")
    explicit = refused(capsys, ["train", "--resume", newest, "--out", out, "--no-progress"])
    assert f"cannot read {newest / 'model.pt'}: it is damaged" in explicit
    assert "could run code" not in explicit
    assert main(["train", "--resume", "auto", "--out", str(out), "--max-steps", "5",
                 "--no-progress"]) == 0  # fmt: skip
    said = " ".join(capsys.readouterr().err.split())  # undo the console's line wrapping
    assert f"skipped checkpoint {newest.name} incomplete/corrupt" in said
    assert "it is damaged or not a file torch.save wrote" in said
    assert f"; using step-{3:09d}" in said
    assert checkpoint.load(checkpoint.latest(run / "checkpoints")).trainer["step"] == 5


def test_a_run_whose_every_checkpoint_is_unreadable_is_refused_naming_each(
    run_with_checkpoints, capsys
):
    out, run = run_with_checkpoints
    for step_dir in checkpoint.list_checkpoints(run / "checkpoints"):
        (step_dir / "rng.pt").write_bytes(b"garbage")
        rewrite_manifest_entry(step_dir, "rng.pt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    line = refused(capsys, ["train", "--resume", run, "--out", out, "--no-progress"])
    assert "no checkpoint under" in line
    assert all(f"step-{s:09d}" in line for s in (2, 3, 4))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    shutil.rmtree(run)
