"""The memory levers on two FSDP2 processes train as one process with the same global batch.

Each rank steps its own shard: torch-optimi's Kahan AdamW runs on the DTensors as they are,
amptrain's stochastic-rounding and 8-bit AdamW on the local shards with their state held as
DTensors. The stated tolerance, per lever, is the disagreement that lever already has from
its own full-precision reference: a bf16 lever's two processes are within 4x of bf16
autocast's two processes from one (each rank rounds its half of the gradient), and 8-bit
state's within 2x of how far 8-bit state is from 32-bit in one process (a gradient that
differs in its last bit can move a moment across a quantization step).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load, load_file
from spawning import spawn
from torch import nn

from amptrain.cli import main

WIDE = ["--layers", "2", "--width", "64", "--heads", "2", "--context", "16", "--device", "cpu",
        "--no-progress", "--no-compile", "--eval-batches", "1", "--max-steps", "4",
        "--lr", "1e-2", "--eval-every", "4"]  # fmt: skip
"""Rows of 64 values: the 8-bit moments' smallest block, so every matrix is quantized."""
TWO = ["--batch-size", "2", "--nproc", "2", "--strategy", "fsdp"]
ONE = ["--batch-size", "4"]


def _run(corpus, out, flags):
    assert main(["train", "--data", str(corpus), *WIDE, *flags, "--out", str(out)]) == 0
    run = next(out.glob("train-*"))
    return load_file(run / "model.safetensors"), json.loads((run / "summary.json").read_text())


def _gap(got, want):
    return max(float((got[name] - want[name]).abs().max()) for name in want)


@pytest.fixture
def runs(tmp_path, corpus):
    return lambda name, flags: _run(corpus, tmp_path / name, flags)


@pytest.mark.slow
def test_bf16_weights_on_two_fsdp_processes_match_one(runs):
    pytest.importorskip("optimi")
    pytest.importorskip("bitsandbytes")
    autocast = _gap(runs("a2", ["--precision", "bf16", *TWO])[0],
                    runs("a1", ["--precision", "bf16", *ONE])[0])  # fmt: skip
    levers = {"kahan": ["--compensation", "kahan"],
              "sr8": ["--compensation", "sr", "--optimizer-state", "8bit"]}  # fmt: skip
    for name, lever in levers.items():
        flags = ["--precision", "bf16-true", *lever]
        (two, s_two), (one, s_one) = (
            runs(name + "2", [*flags, *TWO]),
            runs(name + "1", [*flags, *ONE]),
        )
        fast = s_two["fast_path"]
        assert fast["sharding"]["sharded"] and fast["weights"] == "bf16"
        assert fast["gradient_reduction"] == "fp32"
        assert {str(v.dtype) for v in two.values()} == {"torch.float32"}  # widened as one process's
        assert _gap(two, one) <= 4 * autocast, name  # 0.020-0.044 against 0.022 here
        assert s_two["final_val_loss"] == pytest.approx(s_one["final_val_loss"], rel=0.01), name
    assert fast["optimizer_impl"] == "stochastic rounding, 8-bit moments, sharded"
    # Gradient accumulation: FSDP2 sums the unsharded bf16 gradients in fp32 (its reduce dtype).
    accumulated, _ = runs("sr8-accum", [*flags, "--batch-size", "1", "--grad-accum", "2",
                                        "--nproc", "2", "--strategy", "fsdp"])  # fmt: skip
    assert _gap(accumulated, one) <= 4 * autocast


@pytest.mark.slow
def test_8bit_state_on_two_fsdp_processes_matches_one(tmp_path, runs, capsys):
    pytest.importorskip("bitsandbytes")
    eight = ["--precision", "fp32", "--optimizer-state", "8bit"]
    full = ["--checkpoint-every", "4", "--checkpoint-format", "full"]
    (two, s_two), (one, s_one) = runs("e2", [*eight, *TWO, *full]), runs("e1", [*eight, *ONE])
    assert s_two["fast_path"]["optimizer_impl"] == "8-bit moments, sharded"
    assert s_one["fast_path"]["optimizer_impl"] == "bitsandbytes 8-bit"
    full_state, _ = runs("f1", ["--precision", "fp32", *ONE])
    assert _gap(two, one) <= 2 * _gap(one, full_state)  # 0.0086 against 0.0085 here
    assert s_two["final_val_loss"] == pytest.approx(s_one["final_val_loss"], rel=0.01)
    # The gathered state: 8-bit codes of each matrix, a maximum per 64 values of each row
    (run,) = (tmp_path / "e2").glob("train-*")
    state = torch.load(run / "checkpoints" / "step-000000004" / "optimizer.pt")["state"]
    codes = [s for s in state.values() if s["exp_avg"].dtype == torch.uint8]
    assert len(codes) == 9  # the embedding; qkv, proj, fc, fc-out of 2 blocks (rows of 64, 256)
    for held in codes:
        rows, row = held["exp_avg"].shape
        block = 256 if row % 256 == 0 else 64
        assert (
            held["exp_avg_absmax"].shape == held["exp_avg_sq_absmax"].shape == (rows, row // block)
        )
    # and bitsandbytes' optimizer of one process cannot read it: refused before any work
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    said = "written by amptrain StochasticAdamW 2, 8-bit moments and this run's optimizer is bits"
    assert said in capsys.readouterr().err


def _case_shards(rank, tmp):
    from amptrain import low_weights, sharding
    from amptrain.errors import ModelError
    from amptrain.precision import resolve
    from amptrain.shards import is_shard

    bf16 = resolve("bf16", torch.device("cpu"))
    model = tiny_model(n_layer=2, n_embd=64)
    lowered = low_weights.cast(model, "bf16")
    whole = {id(p) for p in lowered.params}
    sharding.shard(model, bf16, "fsdp", 2)
    lowered.follow_shards(model)  # the run holds the shards only, not a whole bf16 copy
    assert lowered.params and all(is_shard(p) for p in lowered.params)
    assert not whole & {id(p) for p in lowered.params}
    tied = tiny_model(n_layer=2, n_embd=64)
    vocab, width = tied.wte.weight.shape
    tied.blocks[0].extra = nn.Linear(width, vocab)  # a block's layer tied to the embedding:
    tied.blocks[0].extra.weight = tied.wte.weight  # fp32 with it, beside the bf16 layers
    low_weights.cast(tied, "bf16")
    with pytest.raises(ModelError, match=r"float32 \(extra\.weight\) parameters"):
        sharding.shard(tied, bf16, "fsdp", 2)


@pytest.mark.slow
def test_bf16_shards_replace_the_whole_weights_and_a_unit_of_two_dtypes_is_refused(tmp_path):
    spawn("test_memory_levers_fsdp", "shards", tmp_path)


def _window_grads(model, rank, scale=100.0):
    """Each of this rank's two micro-batches' bf16 gradient of the first block's MLP matrix."""
    out = []
    for micro in range(2):
        tokens = torch.randint(
            0, 32, (2, 16), generator=torch.Generator().manual_seed(10 * rank + micro)
        )
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(tokens).float().square().mean() * scale
        loss.backward()
        out.append(model.blocks[0].mlp[0].weight.grad.float().clone())
        model.zero_grad(set_to_none=True)
    return out


def _case_accumulate(rank, tmp):
    """FSDP2 sums a window's unsharded bf16 gradients in fp32 and rounds the shard once."""
    import copy

    from amptrain import low_weights, sharding
    from amptrain.precision import resolve

    model = tiny_model(n_layer=2, n_embd=64)
    low_weights.cast(model, "bf16")
    alone = copy.deepcopy(model)  # the same bf16 weights, unsharded
    each = [g for r in range(2) for g in _window_grads(alone, r)]  # both ranks' micro-batches
    fp32_sum = (sum(each) / 2).bfloat16()  # summed in fp32, averaged over 2 ranks, rounded once
    bf16_sum = ((each[0].bfloat16() + each[1].bfloat16()) + (each[2].bfloat16()
                + each[3].bfloat16())) / 2  # fmt: skip
    sharding.shard(model, resolve("bf16", torch.device("cpu")), "fsdp", 2)
    for micro in range(2):
        tokens = torch.randint(
            0, 32, (2, 16), generator=torch.Generator().manual_seed(10 * rank + micro)
        )
        with sharding.deferred_sync(model, micro == 0), torch.autocast("cpu", torch.bfloat16):
            loss = model(tokens).float().square().mean() * 100.0
        loss.backward()
    got = model.blocks[0].mlp[0].weight.grad.full_tensor()
    assert got.dtype == torch.bfloat16
    same = float((got == fp32_sum).float().mean())
    assert same > 0.99, same  # a few last-bit ties of the fp32 sums' order
    assert float((got == bf16_sum).float().mean()) < same - 0.05  # bf16 sums round more


@pytest.mark.slow
def test_fsdp_sums_a_windows_bf16_gradients_in_fp32(tmp_path):
    spawn("test_memory_levers_fsdp", "accumulate", tmp_path)


@pytest.mark.slow
def test_sharded_bf16_sr_and_8bit_state_resume_bit_for_bit_and_on_one_process(tmp_path, corpus):
    """The DTensor state (bf16 moments' codes and block maxima) is saved in shards by torch's
    distributed checkpoint, read back by two processes, and gathered by one."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "runs"
    flags = ["--precision", "bf16-true", "--compensation", "sr", "--optimizer-state", "8bit",
             "--checkpoint-every", "2", "--eval-every", "2"]  # fmt: skip
    assert main(["train", "--data", str(corpus), *WIDE, *flags, *TWO, "--out", str(out)]) == 0
    (run,) = out.glob("train-*")
    whole = (run / "model.safetensors").read_bytes()
    shutil.rmtree(run / "checkpoints" / "step-000000004")
    (run / "model.safetensors").unlink()
    assert main(["train", "--resume", str(run), "--nproc", "2", "--no-progress"]) == 0
    assert (run / "model.safetensors").read_bytes() == whole
    shutil.rmtree(run / "checkpoints" / "step-000000004")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # one process
    summary = json.loads((run / "summary.json").read_text())
    assert summary["fast_path"]["optimizer_impl"] == "stochastic rounding, 8-bit moments"
    resumed, straight = load_file(run / "model.safetensors"), load(whole)
    assert _gap(resumed, {name: straight[name] for name in resumed}) < 0.05  # two steps of lr 1e-2
