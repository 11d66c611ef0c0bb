"""`--nproc 2 --strategy fsdp` on a Hugging Face Llama with tied embeddings ends, and its `hf/`
export holds the trained weights, still tied: the export is written from the full tensors every
rank gathered, never by rank 0 gathering a sharded tied weight alone (which waited forever)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_fsdp_on_tied_embeddings_exports_and_exits(tmp_path, corpus):
    pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    command = [sys.executable, "-m", "amptrain", "train", "--model", str(tmp_path / "tied"),
               "--data", str(corpus), "--nproc", "2", "--strategy", "fsdp", "--device", "cpu",
               "--context", "16", "--batch-size", "4", "--max-steps", "4", "--precision", "fp32",
               "--no-progress", "--out", str(tmp_path / "runs")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "runs").glob("train-*")
    assert not list(run.glob(".hf.tmp-*"))
    exported = AutoModelForCausalLM.from_pretrained(run / "hf")
    embed, head = exported.model.embed_tokens.weight, exported.lm_head.weight
    assert head.data_ptr() == embed.data_ptr()  # still tied
    trained = load_file(run / "model.safetensors")
    assert torch.equal(embed, trained["model.embed_tokens.weight"])
    original = LlamaForCausalLM.from_pretrained(tmp_path / "tied").model.embed_tokens.weight
    assert not torch.equal(embed, original)  # the trained weights, not the starting ones
