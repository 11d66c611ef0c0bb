"""FSDP2 on CPU with gloo and 2 processes: equal to one process, the loop's guarantees, resharding.

Each spawned run combines several checks, since starting processes is the slow part.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
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

EQUAL = dict(max_steps=20, lr=1e-2, warmup=0.1, eval_every=10, eval_batches=2, clip_norm=0.05)
SMALL = dict(max_steps=4, lr=1e-2, warmup=0.25, eval_every=4, eval_batches=1)


def _spawn(case, tmp_path, *args):
    spawn("test_fsdp", case, tmp_path, *args)


def _fit_and_save(rank, path, model, *args, **kwargs):
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
    _fit_and_save(rank, f"{tmp}/fp32.pt", tiny_model(seed=1), train, val, precision="fp32",
                  batch_size=4, **EQUAL)  # fmt: skip
    _fit_and_save(rank, f"{tmp}/accum.pt", tiny_model(seed=1), train, val, precision="fp32",
                  batch_size=2, grad_accum=2, **SMALL)  # fmt: skip
    prec = _poison_rank(resolve("fp16", torch.device("cpu")), rank, on_rank=1, bad_step=2)
    result = amptrain.fit(tiny_model(seed=1), train, val, precision=prec, batch_size=4,
                          strategy="fsdp", **SMALL)  # fmt: skip
    torch.save(result.to_dict(history=True), f"{tmp}/inf-{rank}.pt")
    _fit_and_save(rank, f"{tmp}/bf16.pt", tiny_model(seed=1), train, val, precision="bf16",
                  batch_size=4, **SMALL)  # fmt: skip


def _single(precision, batch_size, **kwargs):
    model = tiny_model(seed=1)
    result = amptrain.fit(model, pattern_blocks(48), pattern_blocks(16, seed=1),
                          precision=precision, batch_size=batch_size, **kwargs)  # fmt: skip
    return model.state_dict(), result


def _assert_equal(saved, state, result, rtol):
    # The weights as one vector, relative to its norm. Element-wise ratios say little: the key
    # bias has an exactly-zero gradient in exact arithmetic, so Adam moves it by about lr in
    # the direction of rounding noise, which differs with the reduction order (as under DDP).
    got = torch.cat([saved["state"][name].flatten() for name in state])
    want = torch.cat([value.flatten() for value in state.values()])
    assert float((got - want).norm() / want.norm()) <= rtol
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # test_ddp's element bound
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

    # bf16: parameters gathered in bf16 against autocast in one process; 2% on the loss.
    bf16 = torch.load(tmp_path / "bf16.pt", weights_only=True)
    assert bf16["result"]["fast_path"]["sharding"]["param_dtype"] == "bfloat16"
    _, result = _single("bf16", 8, **SMALL)
    assert bf16["result"]["final_val_loss"] == pytest.approx(result.final_val_loss, rel=2e-2)


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


def _case_resume(rank, tmp):
    train, val = pattern_blocks(40), pattern_blocks(8, seed=1)
    kwargs = dict(precision="fp32", batch_size=4, max_steps=8, eval_every=4, eval_batches=1)
    _fit_and_save(rank, f"{tmp}/straight.pt", tiny_model(seed=2), train, val,
                  checkpoint_dir=f"{tmp}/straight", checkpoint_every=4, **kwargs)  # fmt: skip
    ckpt = checkpoint.load(f"{tmp}/straight/step-000000004")
    _fit_and_save(rank, f"{tmp}/resumed2.pt", tiny_model(seed=5), train, val, resume=ckpt,
                  checkpoint_dir=f"{tmp}/resumed2", **kwargs)  # fmt: skip


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_two_and_on_one_process(tmp_path):
    _spawn("resume", tmp_path)
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)
    resumed2 = torch.load(tmp_path / "resumed2.pt", weights_only=True)
    ckpt = checkpoint.load(tmp_path / "straight" / "step-000000004")
    assert ckpt.sharded and checkpoint.verify(ckpt.path) is None
    assert {"world_size": 2, "batch_size": 4, "strategy": "fsdp"}.items() <= ckpt.trainer.items()
    assert not list((tmp_path / "straight").glob(".tmp-*"))  # no temporary left behind
    for name, value in straight["state"].items():
        torch.testing.assert_close(resumed2["state"][name], value, rtol=1e-5, atol=1e-7)

    # One process: batch_size 4 becomes 8, keeping the global batch and the batch sequence.
    model = tiny_model(seed=5)
    result = amptrain.fit(model, pattern_blocks(40), pattern_blocks(8, seed=1), resume=ckpt,
                          precision="fp32", batch_size=4, max_steps=8, eval_every=4,
                          eval_batches=1, strategy="fsdp")  # fmt: skip
    for name, value in straight["state"].items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-7)
    assert result.final_val_loss == pytest.approx(straight["result"]["final_val_loss"], rel=1e-5)

    with pytest.raises(checkpoint.CheckpointError, match="global batch of 8 .*batch_size 3"):
        amptrain.fit(tiny_model(seed=5), pattern_blocks(40), resume=ckpt, precision="fp32",
                     batch_size=3, max_steps=8)  # fmt: skip

    # A shard that does not match the manifest: the checkpoint is never loaded.
    shard = next((ckpt.path / "shards").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    with pytest.raises(checkpoint.CheckpointError, match=r"shards/.*does not match its sha256"):
        checkpoint.load(ckpt.path)


RESUME = dict(precision="fp32", batch_size=4, max_steps=8, eval_every=4, eval_batches=1)


def _fit_on_ranks(rank, name, tmp, strategy, **kwargs):
    """Train the resume test's run under `strategy`; rank 0 saves the full weights and result."""
    model = tiny_model(seed=kwargs.pop("seed", 2))
    result = amptrain.fit(model, pattern_blocks(40), pattern_blocks(8, seed=1),
                          strategy=strategy, **{**RESUME, **kwargs})  # fmt: skip
    state = sharding.full_state_dict(model)  # collective under FSDP
    if rank == 0:
        torch.save({"state": state, "result": result.to_dict()}, f"{tmp}/{name}.pt")


def _case_formats(rank, tmp):
    # DDP writing sharded checkpoints, and full ones (the default), on the same trajectory.
    _fit_on_ranks(rank, "ddp", tmp, "ddp", checkpoint_dir=f"{tmp}/ddp", checkpoint_every=4,
                  checkpoint_format="sharded")  # fmt: skip
    _fit_on_ranks(rank, "ddp_full", tmp, "ddp", checkpoint_dir=f"{tmp}/ddp_full",
                  checkpoint_every=4)  # fmt: skip
    # Switching strategy: DDP's full checkpoint resumed by FSDP, each rank taking its slices.
    full = checkpoint.load(f"{tmp}/ddp_full/step-000000004")
    _fit_on_ranks(rank, "fsdp_from_full", tmp, "fsdp", seed=5, resume=full)
    # FSDP writing full checkpoints (gathered from the shards) on request.
    _fit_on_ranks(rank, "fsdp_full", tmp, "fsdp", checkpoint_dir=f"{tmp}/fsdp_full",
                  checkpoint_every=4, checkpoint_format="full")  # fmt: skip
    # And back: FSDP's sharded checkpoint resumed by DDP, every rank reading whole tensors.
    _fit_on_ranks(rank, "fsdp", tmp, "fsdp", checkpoint_dir=f"{tmp}/fsdp", checkpoint_every=4)
    sharded = checkpoint.load(f"{tmp}/fsdp/step-000000004")
    _fit_on_ranks(rank, "ddp_from_shards", tmp, "ddp", seed=5, resume=sharded)


def _assert_same_run(got, want, rtol=1e-5):
    """The weights as one vector within `rtol` of its norm, and element-wise within 1e-5.

    Across strategies the reductions run in another order, so the bound is
    `_assert_equal`'s rather than bitwise.
    """
    got = torch.cat([got[name].flatten() for name in want])
    want = torch.cat([value.flatten() for value in want.values()])
    assert float((got - want).norm() / want.norm()) <= rtol
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _shard_bytes(path):
    return sum(f.stat().st_size for f in (path / "shards").glob("*.distcp"))


@pytest.mark.slow
def test_checkpoint_formats_and_switching_strategy_on_resume(tmp_path):
    _spawn("formats", tmp_path)
    runs = {p.stem: torch.load(p, weights_only=True) for p in tmp_path.glob("*.pt")}
    reference = runs["ddp"]["state"]
    for name in ("ddp_full", "fsdp_full", "fsdp", "fsdp_from_full", "ddp_from_shards"):
        _assert_same_run(runs[name]["state"], reference)
        assert runs[name]["result"]["steps"] == 8, name

    # DDP's sharded checkpoint: DCP files, the replicated state written once between the ranks.
    ddp_ckpt = checkpoint.load(tmp_path / "ddp" / "step-000000004")
    assert ddp_ckpt.sharded and ddp_ckpt.trainer["strategy"] == "ddp"
    assert not checkpoint.load(tmp_path / "ddp_full" / "step-000000004").sharded
    fsdp_full = checkpoint.load(tmp_path / "fsdp_full" / "step-000000004")
    assert not fsdp_full.sharded and set(fsdp_full.tensors["model"]) == set(reference)

    # Resumed on one process (batch 4 x 2 ranks becomes 8): equal to the uninterrupted run.
    for ckpt, out in ((ddp_ckpt, "one"), (fsdp_full, None)):
        model = tiny_model(seed=5)
        amptrain.fit(model, pattern_blocks(40), pattern_blocks(8, seed=1), resume=ckpt,
                     checkpoint_dir=out and tmp_path / out, checkpoint_format="sharded",
                     **RESUME)  # fmt: skip
        _assert_same_run(model.state_dict(), reference)
    # One process wrote the same tensors as the two DDP ranks together: nothing twice.
    one = checkpoint.load(tmp_path / "one" / "step-000000008")
    assert one.sharded
    assert _shard_bytes(ddp_ckpt.path) == pytest.approx(_shard_bytes(one.path), rel=0.05)


@pytest.mark.slow
def test_a_resumed_run_may_switch_strategy_and_checkpoint_format(tmp_path, capsys):
    from amptrain.cli import main

    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    common = ["train", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "runs"),
              "--precision", "fp32", "--context", "16", "--layers", "2", "--width", "16",
              "--heads", "2", "--batch-size", "4", "--checkpoint-every", "2",
              "--no-progress"]  # fmt: skip
    assert main([*common, "--max-steps", "4"]) == 0  # ddp: full checkpoints
    switch = ["--strategy", "fsdp", "--checkpoint-format", "sharded"]
    assert main([*common, "--max-steps", "6", *switch, "--resume", "auto"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    fit = json.loads((run / "config.json").read_text())["fit"]
    assert (fit["strategy"], fit["checkpoint_format"], fit["max_steps"]) == ("fsdp", "sharded", 6)
    older, newest = (
        checkpoint.load(p) for p in checkpoint.list_checkpoints(run / "checkpoints")[-2:]
    )
    assert not older.sharded and older.trainer["step"] == 4
    assert newest.sharded and newest.trainer["strategy"] == "fsdp"
    # The full checkpoint written before the switch still resumes under the switched config.
    assert main([*common, "--max-steps", "6", *switch, "--resume", str(older.path)]) == 0
    assert main([*common, "--max-steps", "6", "--lr", "0.5", "--resume", "auto"]) == 2
    assert "--lr (the run has 0.001" in capsys.readouterr().err  # others still refused


def _wait_for_step(metrics, step, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(x).get("step", 0) >= step for x in lines if "train/loss" in x):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step} (exit {proc.poll()})")


@pytest.mark.slow
def test_sigterm_to_an_fsdp_run_checkpoints_and_resume_auto_continues(tmp_path):
    total = 600  # steps: enough that a loaded machine cannot end the run before the signal
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "amptrain", "train", "--out", "runs", "--no-progress"]
    proc = subprocess.Popen(
        [*train, "--nproc", "2", "--strategy", "fsdp", "--data", "corpus.txt", "--precision",
         "fp32", "--context", "16", "--layers", "2", "--width", "16", "--heads", "2",
         "--batch-size", "2", "--max-steps", str(total), "--eval-every", str(total // 2)],
        cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    (run,) = _wait_dir(tmp_path / "runs", proc)
    _wait_for_step(run / "metrics.jsonl", 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the launcher and every rank
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, f"the run ended before the signal: {err[-2000:]}"
    (ckpt,) = checkpoint.list_checkpoints(run / "checkpoints")
    saved = checkpoint.load(ckpt)
    assert saved.sharded and 3 <= saved.trainer["step"] < total, saved.trainer
    assert not list((run / "checkpoints").glob(".tmp-*"))

    # --resume auto on one process: the sharded checkpoint loads whole, batch 2 x 2 becomes 4.
    out = subprocess.run([*train, "--resume", "auto"], cwd=tmp_path, env=env, timeout=600,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch_size 4 per process keeps the global batch 4" in " ".join(out.stderr.split())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == total
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in x]  # fmt: skip
    assert steps == list(range(1, total + 1))  # each step once, across the interruption


def _wait_dir(root, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(root.glob("train-*")) if root.exists() else []
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no run directory under {root} (exit {proc.poll()})")


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
        if rank == 0:
            record = result.fast_path["sharding"]
            found = {"keys_kept": sorted(state) == keys, "units": record["units"],
                     "steps": result.steps, "resumed_steps": resumed.steps}  # fmt: skip
            Path(f"{tmp}/{name}.json").write_text(json.dumps(found))


@pytest.mark.slow
def test_model_styles_shard_per_block(tmp_path):
    _spawn("styles", tmp_path)
    found = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert found["nanogpt"] == {"keys_kept": True, "units": "2 x Block (transformer.h) + root",
                                "steps": 2, "resumed_steps": 3}  # fmt: skip
    assert found["llama_style"]["units"] == "2 x TransformerBlock (layers) + root"
    if "hf_llama" in found:
        assert found["hf_llama"]["units"] == "2 x LlamaDecoderLayer (model.layers) + root"
    assert all(r["keys_kept"] and r["steps"] == 2 for r in found.values())
    assert all(r["resumed_steps"] == 3 for r in found.values())
    for name in found:  # a full checkpoint: AdamW state for every parameter, keyed as torch keys it
        optimizer = checkpoint.load(tmp_path / name / "step-000000002").tensors["optimizer"]
        ids = [i for group in optimizer["param_groups"] for i in group["params"]]
        assert sorted(optimizer["state"]) == sorted(ids) == list(range(len(ids))), name


def test_a_staged_checkpoint_lists_its_shards_and_refuses_paths_outside(tmp_path):
    staged = checkpoint.staging_dir(tmp_path, 7)
    (staged / "shards").mkdir(parents=True)
    (staged / "shards" / ".metadata").write_bytes(b"meta")
    (staged / "shards" / "__0_0.distcp").write_bytes(b"rank 0")
    tensors = {"scheduler": {}, "scaler": {}, "rng": {"ranks": []}}
    path = checkpoint.save(tmp_path, 7, tensors, {"step": 7}, staged=staged)
    manifest = json.loads((path / "manifest.json").read_text())
    assert {"shards/.metadata", "shards/__0_0.distcp"} <= set(manifest)
    assert checkpoint.verify(path) is None and not staged.exists()
    assert checkpoint.load(path).sharded and "model" not in checkpoint.load(path).tensors
    (path / "shards" / ".metadata").unlink()  # a shard gone: never the newest
    assert "shards/.metadata is missing" in checkpoint.verify(path)
    assert checkpoint.latest(tmp_path) is None
    (path / "shards" / ".metadata").write_bytes(b"meta")
    for name in ("shards/../../x", "../x", "other/x", "shards/a/b"):
        manifest[name] = {"size": 0, "sha256": ""}
        (path / "manifest.json").write_text(json.dumps(manifest))
        assert "outside the checkpoint directory" in checkpoint.verify(path), name
        del manifest[name]
