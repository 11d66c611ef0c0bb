"""FSDP2 on CPU with gloo and 2 processes: equal to one process, the loop's guarantees, resharding.

Each spawned run combines several checks, since starting processes is the slow part.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import pattern_blocks, tiny_model
from spawning import spawn
from torch import nn

import amptrain
from amptrain import checkpoint, sharding
from amptrain.errors import ConfigError, ModelError
from amptrain.precision import resolve

EQUAL = dict(
    max_steps=20, lr=1e-2, warmup=0.1, eval_every=10, eval_batches=2, clip_norm=0.05, log_every=1
)
SMALL = dict(max_steps=4, lr=1e-2, warmup=0.25, eval_every=4, eval_batches=1, log_every=1)


def _spawn(case, tmp_path, *args):
    spawn("test_fsdp", case, tmp_path, *args)


def fit_and_save(rank, path, model, *args, **kwargs):
    """Train under FSDP; rank 0 saves the gathered weights and the result."""
    result = amptrain.fit(model, *args, strategy="fsdp", **kwargs)
    state = sharding.full_state_dict(model)  # collective
    if rank == 0:
        torch.save({"state": state, "result": result.to_dict(history=True)}, path)


def _poison_rank(prec, rank, on_rank, bad_step):
    """Make one parameter's local gradient shard inf at `bad_step`, on one rank only.

    After the reduce-scatter an overflow sits in one rank's shard alone, which is the case the
    loss scaler must agree on.
    """
    calls, unscale = [0], prec.unscale_

    def poisoned(optimizer):
        calls[0] += 1
        if rank == on_rank and calls[0] == bad_step:
            grad = optimizer.param_groups[0]["params"][0].grad
            grad.to_local().fill_(math.inf)
        unscale(optimizer)

    prec.unscale_ = poisoned
    return prec


def _case_equal(rank, tmp):
    train, val = pattern_blocks(48), pattern_blocks(16, seed=1)
    fit_and_save(rank, f"{tmp}/fp32.pt", tiny_model(seed=1), train, val, precision="fp32",
                  batch_size=4, **EQUAL)  # fmt: skip
    fit_and_save(rank, f"{tmp}/accum.pt", tiny_model(seed=1), train, val, precision="fp32",
                  batch_size=2, grad_accum=2, **SMALL)  # fmt: skip
    prec = _poison_rank(resolve("fp16", torch.device("cpu")), rank, on_rank=1, bad_step=2)
    result = amptrain.fit(tiny_model(seed=1), train, val, precision=prec, batch_size=4,
                          strategy="fsdp", **SMALL)  # fmt: skip
    torch.save(result.to_dict(history=True), f"{tmp}/inf-{rank}.pt")
    fit_and_save(rank, f"{tmp}/bf16.pt", tiny_model(seed=1), train, val, precision="bf16",
                  batch_size=4, **SMALL)  # fmt: skip


def _single(precision, batch_size, **kwargs):
    model = tiny_model(seed=1)
    result = amptrain.fit(model, pattern_blocks(48), pattern_blocks(16, seed=1),
                          precision=precision, batch_size=batch_size, **kwargs)  # fmt: skip
    return model.state_dict(), result


def assert_same_weights(got, want, rtol=1e-5):
    """The weights as one vector within `rtol` of its norm, and element-wise within 1e-5.

    Element-wise ratios say little: the key bias has an exactly-zero gradient in exact
    arithmetic, so Adam moves it by about lr in the direction of rounding noise, which differs
    with the reduction order (as under DDP, whose element bound this is).
    """
    got = torch.cat([got[name].flatten() for name in want])
    want = torch.cat([value.flatten() for value in want.values()])
    assert float((got - want).norm() / want.norm()) <= rtol
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _assert_equal(saved, state, result, rtol):
    assert_same_weights(saved["state"], state, rtol)
    got = [h for h in saved["result"]["history"] if "train/loss" in h]
    want = [h for h in result.history if "train/loss" in h]
    for key in ("train/loss", "train/grad_norm"):
        assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=rtol), key
    assert saved["result"]["final_val_loss"] == pytest.approx(result.final_val_loss, rel=rtol)


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path):
    _spawn("equal", tmp_path)
    fp32 = torch.load(tmp_path / "fp32.pt", weights_only=True)
    state, result = _single("fp32", 8, **EQUAL)
    _assert_equal(fp32, state, result, rtol=1e-5)  # loss, clipped grad norm and weights
    assert all(h["train/grad_norm"] > EQUAL["clip_norm"] for h in result.history
               if "train/grad_norm" in h)  # fmt: skip  # clipping acted on every step
    sharded = fp32["result"]["fast_path"]["sharding"]
    assert sharded["sharded"] and sharded["units"] == "2 x Block (blocks) + root"

    # Accumulation: 2 ranks x batch 2 x 2 micro-batches equals 1 process x batch 4 x 2.
    state, result = _single("fp32", 4, grad_accum=2, **SMALL)
    _assert_equal(torch.load(tmp_path / "accum.pt", weights_only=True), state, result, 1e-5)

    inf = [torch.load(tmp_path / f"inf-{r}.pt", weights_only=True) for r in (0, 1)]
    for r in (0, 1):  # rank 1's inf skipped the step on both ranks and halved both scales
        assert inf[r]["skipped_steps"] == 1
        assert [h["amp/skipped_steps"] for h in inf[r]["history"] if "train/loss" in h] == [
            0, 1, 1, 1]  # fmt: skip
        assert inf[r]["loss_scale"] == 65536.0 / 2
        assert inf[r]["fast_path"]["sharding"]["reduce_dtype"] == "float32"

    # bf16: the blocks' matrices gathered in bf16, what autocast keeps fp32 gathered in fp32.
    bf16 = torch.load(tmp_path / "bf16.pt", weights_only=True)
    assert bf16["result"]["fast_path"]["sharding"]["param_dtype"] == "bfloat16"
    assert bf16["result"]["fast_path"]["sharding"]["units"].endswith(
        "4 fp32 layers (norms, embeddings)"
    )
    _, result = _single("bf16", 8, **SMALL)
    # 6e-6 apart here; with every parameter gathered in bf16 (the residual stream in bf16), 2.6e-4
    assert bf16["result"]["final_val_loss"] == pytest.approx(result.final_val_loss, rel=5e-5)


class NoStack(nn.Module):
    """A model whose layers are plain attributes: nothing for FSDP to make units of."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(32, 8), nn.Linear(8, 32)

    def forward(self, x):
        return self.head(self.emb(x))


def test_unshardable_model_and_unknown_strategy_are_refused():
    with pytest.raises(ModelError, match=r"^my\.py:NoStack \(NoStack\) cannot be sharded.*"
                       "no stack of repeated blocks.*strategy 'ddp'"):  # fmt: skip
        amptrain.fit(NoStack(), pattern_blocks(8), strategy="fsdp", source="my.py:NoStack")
    with pytest.raises(ConfigError, match="strategy='zero3' is invalid: it must be one of ddp, "):
        amptrain.fit(tiny_model(), pattern_blocks(8), strategy="zero3")


def test_refusals_exit_2_with_one_line(tmp_path, capsys):
    from amptrain.cli import main

    model_file = tmp_path / "flat.py"
    model_file.write_text(
        "from torch import nn\n\nclass Flat(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.emb, self.head = nn.Embedding(256, 8), "
        "nn.Linear(8, 256)\n\n    def forward(self, x):\n        return self.head(self.emb(x))\n"
    )
    (tmp_path / "t.txt").write_text("hello world " * 200)
    common = ["train", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "runs"),
              "--context", "16", "--max-steps", "1"]  # fmt: skip
    assert main([*common, "--strategy", "zero3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strategy='zero3' is invalid" in err[0], err
    assert main([*common, "--checkpoint-format", "dcp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "checkpoint_format='dcp' is invalid: it must be one of auto, " in err[0]
    )
    assert main([*common, "--strategy", "fsdp", "--model", f"{model_file}:Flat"]) == 2
    err = capsys.readouterr().err  # after the model file's import notice, the refusal alone
    assert "Traceback" not in err and "run directory" not in err
    assert "cannot be sharded with strategy 'fsdp'" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    # --nproc 2: refused before the launcher starts (its own report would bury the line)
    assert main([*common, "--nproc", "2", "--strategy", "fsdp", "--model",
                 f"{model_file}:Flat"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "cannot be sharded with strategy 'fsdp'" in err.strip().splitlines()[-1], err
    assert "Traceback" not in err and "torch.distributed" not in err


def _style_models():
    """nanoGPT (tied embedding and head), a Llama-style file, and a Hugging Face Llama."""
    sys.path.insert(0, str(Path(__file__).parent / "model_styles"))
    from llama_style import ModelArgs, Transformer
    from nanogpt_model import GPT, GPTConfig

    torch.manual_seed(0)
    models = {
        "nanogpt": GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16)),
        "llama_style": Transformer(ModelArgs(dim=16, n_layers=2, n_heads=2, vocab_size=32,
                                             max_seq_len=16)),
    }  # fmt: skip
    try:
        import transformers
    except ImportError:
        return models
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    models["hf_llama"] = transformers.AutoModelForCausalLM.from_config(config)
    return models


def _case_styles(rank, tmp):
    for name, model in _style_models().items():
        keys = sorted(model.state_dict())
        result = amptrain.fit(model, pattern_blocks(16), precision="fp32", batch_size=2,
                              max_steps=2, strategy="fsdp", source=name,
                              checkpoint_dir=f"{tmp}/{name}", checkpoint_format="full")  # fmt: skip
        state = sharding.full_state_dict(model)
        # The full checkpoint (gathered; nanoGPT ties its head to the embedding) goes back
        # into the shards of a fresh copy.
        ckpt = checkpoint.load(f"{tmp}/{name}/step-000000002")
        resumed = amptrain.fit(_style_models()[name], pattern_blocks(16), precision="fp32",
                               batch_size=2, max_steps=3, strategy="fsdp", resume=ckpt)  # fmt: skip
        # bf16: the norms inside the blocks become fp32 units of their own (RMSNorm included)
        low = amptrain.fit(_style_models()[name], pattern_blocks(16), precision="bf16",
                           batch_size=2, max_steps=2, strategy="fsdp")  # fmt: skip
        # bf16 weights: an untied head outside the blocks is a bf16 unit of its own
        true = _style_models()[name]
        true_run = amptrain.fit(true, pattern_blocks(16), precision="bf16-true",
                                compensation="sr", batch_size=2, max_steps=2,
                                strategy="fsdp")  # fmt: skip
        widened = {str(v.dtype) for v in sharding.full_state_dict(true).values()
                   if v.is_floating_point()}  # fmt: skip
        if rank == 0:
            record = result.fast_path["sharding"]
            found = {"keys_kept": sorted(state) == keys, "units": record["units"],
                     "steps": result.steps, "resumed_steps": resumed.steps,
                     "bf16_units": low.fast_path["sharding"]["units"],
                     "bf16_finite": math.isfinite(low.final_train_loss),
                     "true_units": true_run.fast_path["sharding"]["units"],
                     "true_finite": math.isfinite(true_run.final_train_loss),
                     "true_saved": sorted(widened)}  # fmt: skip
            Path(f"{tmp}/{name}.json").write_text(json.dumps(found))


@pytest.mark.slow
def test_model_styles_shard_per_block(tmp_path):
    _spawn("styles", tmp_path)
    found = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert {k: found["nanogpt"][k] for k in ("keys_kept", "units", "steps", "resumed_steps")} == {
        "keys_kept": True, "units": "2 x Block (transformer.h) + root", "steps": 2,
        "resumed_steps": 3}  # fmt: skip
    assert found["llama_style"]["units"] == "2 x TransformerBlock (layers) + root"
    if "hf_llama" in found:
        assert found["hf_llama"]["units"] == "2 x LlamaDecoderLayer (model.layers) + root"
    assert all(r["keys_kept"] and r["steps"] == 2 for r in found.values())
    assert all(r["resumed_steps"] == 3 for r in found.values())
    assert (
        found["nanogpt"]["bf16_units"]
        == "2 x Block (transformer.h) + root, 4 fp32 layers (norms, embeddings)"
    )
    if "hf_llama" in found:  # input and post-attention RMSNorm of each layer
        assert found["hf_llama"]["bf16_units"].endswith(", 4 fp32 layers (norms, embeddings)")
    assert all(r["bf16_finite"] for r in found.values())
    assert all(r["true_finite"] and r["true_saved"] == ["torch.float32"] for r in found.values())
    assert found["nanogpt"]["true_units"] == found["nanogpt"]["bf16_units"]  # its head is tied
    assert found["llama_style"]["true_units"].endswith(", 1 bf16 layers outside the blocks")
    for name in found:  # a full checkpoint: AdamW state for every parameter, keyed as torch keys it
        optimizer = checkpoint.load(tmp_path / name / "step-000000002").tensors["optimizer"]
        ids = [i for group in optimizer["param_groups"] for i in group["params"]]
        assert sorted(optimizer["state"]) == sorted(ids) == list(range(len(ids))), name
