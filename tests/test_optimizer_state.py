"""`--optimizer-state 8bit`: bitsandbytes' blockwise 8-bit AdamW moments on the CPU; large
tensors hold 8-bit state and small ones 32-bit; the run trains, records it, and resumes bit for
bit; where it cannot run it is refused before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import pattern_blocks, tiny_model

import amptrain
from amptrain.cli import main
from amptrain.errors import ConfigError

bnb = pytest.importorskip("bitsandbytes")

TINY = ["--layers", "2", "--width", "64", "--heads", "2", "--context", "16", "--batch-size", "4",
        "--precision", "fp32", "--device", "cpu", "--no-progress", "--no-compile",
        "--eval-batches", "1", "--optimizer-state", "8bit"]  # fmt: skip


def test_8bit_moments_train_and_small_tensors_keep_32bit_state():
    model = tiny_model(n_embd=64, n_head=2)
    result = amptrain.fit(model, pattern_blocks(48), pattern_blocks(16, seed=1), precision="fp32",
                          max_steps=20, batch_size=8, lr=1e-2, eval_every=20, eval_batches=1,
                          compile=False, optimizer_state="8bit")  # fmt: skip
    assert result.final_val_loss < result.initial_val_loss
    assert result.fast_path["optimizer_impl"] == "bitsandbytes 8-bit"


def test_a_run_with_8bit_state_resumes_bit_for_bit(tmp_path, corpus):
    out = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--max-steps", "6", "--checkpoint-every", "3",
                 "--eval-every", "3", "--out", str(out), *TINY]) == 0  # fmt: skip
    (run,) = out.glob("train-*")
    whole = (run / "model.safetensors").read_bytes()
    saved = json.loads((run / "config.json").read_text())
    assert saved["fit"]["optimizer_state"] == "8bit"
    state = torch.load(run / "checkpoints" / "step-000000003" / "optimizer.pt", weights_only=True)
    first = [s["__bnb_optimizer_quant_state__"]["state1"] for s in state["state"].values()]
    assert {t.dtype for t in first} == {torch.uint8, torch.float32}  # both kinds are there
    for moment in first:  # 8-bit from 4,096 elements on, 32-bit below
        assert (moment.dtype == torch.uint8) == (moment.numel() >= 4096), moment.shape
    shutil.rmtree(run / "checkpoints" / "step-000000006")
    (run / "model.safetensors").unlink()
    assert main(["train", "--resume", str(run), "--out", str(out), "--no-progress"]) == 0
    assert (run / "model.safetensors").read_bytes() == whole


def test_8bit_state_where_it_cannot_run_is_refused_before_any_work(tmp_path, corpus, capsys):
    out = tmp_path / "runs"
    code = main(["train", "--data", str(corpus), *TINY, "--precision", "bf16-true",
                 "--compensation", "kahan", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "8-bit AdamW state takes --compensation sr" in err, err
    assert not out.exists() or not list(out.iterdir())
    with pytest.raises(ConfigError, match="optimizer_state='4bit' is invalid"):
        amptrain.fit(tiny_model(), pattern_blocks(16), pattern_blocks(8), optimizer_state="4bit")
