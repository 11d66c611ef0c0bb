"""The record says what ran: half-precision parameters are refused (amptrain keeps fp32 master
weights), and a Hugging Face checkpoint saved in bf16 is trained from fp32 weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import pattern_blocks, save_tiny_gpt2, tiny_model

import amptrain
from amptrain.cli import main
from amptrain.errors import ModelError


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_refused_before_any_step(dtype):
    model = tiny_model().to(dtype)
    with pytest.raises(ModelError, match=f"in {str(dtype)[6:]} .*model.float()"):
        amptrain.fit(model, pattern_blocks(8), precision="fp32", max_steps=1, batch_size=2)


def test_a_bf16_hugging_face_checkpoint_trains_from_fp32_weights(tmp_path, corpus):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    path = save_tiny_gpt2(tmp_path / "gpt2", corpus.read_text())
    AutoModelForCausalLM.from_pretrained(path).to(torch.bfloat16).save_pretrained(path)
    from safetensors.torch import load_file

    saved = load_file(path / "model.safetensors")
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.bfloat16}
    out = tmp_path / "runs"
    assert main(["train", "--model", str(path), "--data", str(corpus), "--context", "16",
                 "--batch-size", "2", "--max-steps", "1", "--precision", "fp32", "--out",
                 str(out), "--no-progress"]) == 0  # fmt: skip
    (run,) = out.iterdir()
    weights = load_file(run / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}


def test_a_run_that_fails_mid_way_has_its_fast_path_on_disk(tmp_path, corpus, monkeypatch):
    from amptrain import stepping
    from amptrain.config import FitOptions, TrainConfig
    from amptrain.train import run_training

    def fails(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(stepping, "train_step", fails)
    cfg = TrainConfig(data=str(corpus), context=16, out=str(tmp_path / "runs"), precision="fp32",
                      model_kwargs={"n_layer": 1, "n_embd": 16, "n_head": 2},
                      fit=FitOptions(max_steps=3, batch_size=2))  # fmt: skip
    with pytest.raises(RuntimeError, match="went away"):
        run_training(cfg)
    (run,) = (tmp_path / "runs").iterdir()
    fast_path = json.loads((run / "config.json").read_text())["environment"]["fast_path"]
    assert fast_path["attention"] and fast_path["loss"] in ("fused", "unfused")
