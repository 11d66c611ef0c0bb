"""bf16 weights (`--precision bf16-true`): the matrices in bf16, embeddings and norms in fp32;
Kahan-compensated updates keep what nearest rounding drops; the run trains, records what was
kept, and resumes bit for bit; where it cannot apply it is refused before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import pattern_blocks, tiny_model
from torch import nn

import amptrain
from amptrain.cli import main
from amptrain.config import FitOptions
from amptrain.errors import ConfigError
from amptrain.optim import make_optimizer

pytest.importorskip("optimi")


def _lost_updates(compensation: str, steps: int = 200) -> float:
    """How far a bf16 weight of 1.0 moves under `steps` AdamW updates of about 1e-4 each.

    At 1.0 a bf16 step is 2**-7 (0.0078): nearest rounding drops every update of 1e-4.
    """
    layer = nn.Linear(1, 1, bias=False)
    layer.weight.data = torch.ones(1, 1, dtype=torch.bfloat16)
    opts = FitOptions(lr=1e-4, weight_decay=0.0, weights="bf16", compensation=compensation)
    optimizer = make_optimizer(layer, opts)
    for _ in range(steps):
        layer.weight.grad = torch.ones_like(layer.weight)  # Adam's update: about lr a step
        optimizer.step()
    return 1.0 - float(layer.weight)


def test_kahan_keeps_the_updates_nearest_rounding_drops():
    assert _lost_updates("none") == 0.0  # every update rounded away
    moved = _lost_updates("kahan")
    assert moved == pytest.approx(200 * 1e-4, rel=0.1)  # all 200 updates kept


def test_bf16_weights_train_with_embeddings_and_norms_in_fp32():
    model = tiny_model(n_layer=2, n_embd=32)
    result = amptrain.fit(model, pattern_blocks(48), pattern_blocks(16, seed=1),
                          precision="bf16-true", max_steps=30, batch_size=8, lr=1e-2,
                          eval_every=30, eval_batches=1, compile=False)  # fmt: skip
    assert result.final_val_loss < result.initial_val_loss
    assert result.fast_path["weights"] == "bf16"
    assert result.fast_path["optimizer_impl"] == "optimi, Kahan"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 again after
    matrices = sum(p.numel() for n, p in model.named_parameters()
                   if p.dim() >= 2 and n not in ("wte.weight", "wpe.weight"))  # fmt: skip
    assert result.fast_path["bf16_parameters"] == matrices  # tiny-gpt ties lm_head to wte
    kept = result.fast_path["kept_fp32"]
    assert "wte.weight" in kept and "wpe.weight" in kept and "ln_f.weight" in kept


def test_a_bf16_true_run_resumes_bit_for_bit(tmp_path, corpus):
    out = tmp_path / "runs"
    flags = ["--layers", "2", "--width", "32", "--heads", "2", "--context", "16",
             "--batch-size", "4", "--device", "cpu", "--no-progress", "--no-compile",
             "--eval-batches", "1"]  # fmt: skip
    assert main(["train", "--data", str(corpus), "--precision", "bf16-true", "--max-steps", "6",
                 "--checkpoint-every", "3", "--eval-every", "3", "--out", str(out),
                 *flags]) == 0  # fmt: skip
    (run,) = out.glob("train-*")
    saved = json.loads((run / "config.json").read_text())
    assert saved["precision"] == "bf16" and saved["fit"]["weights"] == "bf16"
    whole = (run / "model.safetensors").read_bytes()
    state = torch.load(run / "checkpoints" / "step-000000003" / "optimizer.pt", weights_only=True)
    assert any(s.get("kahan_comp") is not None for s in state["state"].values())
    shutil.rmtree(run / "checkpoints" / "step-000000006")
    (run / "model.safetensors").unlink()
    assert main(["train", "--resume", str(run), "--out", str(out), "--no-progress"]) == 0
    assert (run / "model.safetensors").read_bytes() == whole


@pytest.mark.parametrize("extra, said", [
    (dict(precision="fp32", weights="bf16"), "they need precision bf16"),
    (dict(precision="bf16-true", grad_accum=2), "gradient accumulation"),
    (dict(precision="bf16-true", optimizer_state="8bit"), "16-bit AdamW state"),
    (dict(precision="bf16-true", optimizer_impl="fused"), "not --optimizer-impl fused"),
])  # fmt: skip
def test_bf16_weights_where_they_cannot_apply_are_refused(extra, said):
    model = tiny_model()
    with pytest.raises(ConfigError, match=said):
        amptrain.fit(model, pattern_blocks(16), pattern_blocks(8), max_steps=1, batch_size=4,
                     **extra)  # fmt: skip
    assert all(p.dtype == torch.float32 for p in model.parameters())  # nothing was cast


def test_a_bf16_true_model_trains_on_and_resumes_only_with_bf16_weights(tmp_path):
    from amptrain import checkpoint
    from amptrain.checkpoint import CheckpointError

    model, train, val = tiny_model(), pattern_blocks(32), pattern_blocks(8, seed=1)
    common = dict(max_steps=2, batch_size=4, eval_every=2, eval_batches=1, compile=False)
    amptrain.fit(model, train, val, precision="bf16-true", checkpoint_dir=tmp_path, **common)
    amptrain.fit(model, train, val, precision="bf16-true", **common)  # on its bf16 matrices
    ckpt = checkpoint.load(checkpoint.latest(tmp_path))
    with pytest.raises(CheckpointError, match="trained with bf16 weights and this run asks"):
        amptrain.fit(tiny_model(), train, val, precision="bf16", resume=ckpt,
                     **{**common, "max_steps": 4})  # fmt: skip
