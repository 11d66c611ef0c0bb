"""DDP on CPU with gloo and 2 processes: equivalence, agreement on skips, rank-0 files, resume."""

from __future__ import annotations

import atexit
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import pattern_blocks, tiny_model
from spawning import spawn

import amptrain
from amptrain import checkpoint, distributed, resharding
from amptrain.callbacks import Callback
from amptrain.config import FitOptions, TrainConfig
from amptrain.errors import Interrupted

COMMON = dict(max_steps=4, lr=1e-2, warmup=0.25, eval_every=2, eval_batches=2, log_every=1)


def _spawn(case, tmp_path, *args):
    spawn("test_ddp", case, tmp_path, *args)


class InfOnRank(Callback):
    """Turns one parameter's local gradient to inf at `bad_step`, on one rank only."""

    def __init__(self, model, bad_step, rank, on_rank):
        self.state, self.bad_step = None, bad_step
        if rank == on_rank:
            next(model.parameters()).register_hook(self._hook)

    def _hook(self, grad):
        if self.state is not None and self.state.step + 1 == self.bad_step:
            return torch.full_like(grad, math.inf)
        return grad

    def on_fit_start(self, state):
        self.state = state


def _case_main(rank, tmp):
    train, val = pattern_blocks(48), pattern_blocks(16, seed=1)
    model = tiny_model(seed=1)
    result = amptrain.fit(model, train, val, precision="fp32", batch_size=4, **COMMON)
    torch.save({"state": model.state_dict(), "result": result.to_dict(history=True)},
               f"{tmp}/match-{rank}.pt")  # fmt: skip

    model = tiny_model(seed=1)
    inject = InfOnRank(model, bad_step=2, rank=rank, on_rank=1)
    result = amptrain.fit(model, train, val, precision="fp16", batch_size=4, callbacks=[inject],
                          **COMMON)  # fmt: skip
    torch.save({"state": model.state_dict(), "result": result.to_dict(history=True)},
               f"{tmp}/inf-{rank}.pt")  # fmt: skip

    result = amptrain.fit(tiny_model(seed=1), train, val, precision="bf16", batch_size=4, **COMMON)
    torch.save({"result": result.to_dict()}, f"{tmp}/bf16-{rank}.pt")

    from amptrain.train import run_training

    cfg = TrainConfig(context=16, data=f"{tmp}/corpus.txt", out=f"{tmp}/runs",
                      model_kwargs={"n_layer": 1, "n_embd": 16, "n_head": 2},
                      fit=FitOptions(max_steps=3, batch_size=2, eval_every=3,
                                     log_every=1))  # fmt: skip
    run_training(cfg)


def test_two_processes_match_one_and_agree_on_skips(tmp_path):
    (tmp_path / "corpus.txt").write_text("abcdefghij" * 300)
    _spawn("main", tmp_path)

    single = tiny_model(seed=1)
    train, val = pattern_blocks(48), pattern_blocks(16, seed=1)
    expected = amptrain.fit(single, train, val, precision="fp32", batch_size=8, **COMMON)
    match = [torch.load(tmp_path / f"match-{r}.pt", weights_only=True) for r in (0, 1)]
    for name, param in single.state_dict().items():
        torch.testing.assert_close(match[0]["state"][name], param, atol=1e-5, rtol=0)
        assert torch.equal(match[0]["state"][name], match[1]["state"][name])  # ranks agree
    assert match[0]["result"]["final_val_loss"] == pytest.approx(expected.final_val_loss, abs=1e-5)

    inf = [torch.load(tmp_path / f"inf-{r}.pt", weights_only=True) for r in (0, 1)]
    for r in (0, 1):
        assert inf[r]["result"]["skipped_steps"] == 1  # rank 1's inf skipped the step everywhere
        steps = [h for h in inf[r]["result"]["history"] if "train/loss" in h]
        assert [h["amp/skipped_steps"] for h in steps] == [0, 1, 1, 1]
    assert all(torch.equal(inf[0]["state"][k], inf[1]["state"][k]) for k in inf[0]["state"])

    bf16 = torch.load(tmp_path / "bf16-0.pt", weights_only=True)["result"]
    assert bf16["precision"] == "bf16" and math.isfinite(bf16["final_val_loss"])

    (run,) = (tmp_path / "runs").iterdir()  # one run directory, written by rank 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if "train/loss" in x]
    assert steps == [1, 2, 3]  # each step logged once
    assert (run / "model.safetensors").exists() and (run / "summary.json").exists()


def _case_train(rank, tmp, tag, stop_at, resume):
    model = tiny_model(seed=2, dropout=0.1)
    ckpt = checkpoint.load(checkpoint.latest(f"{tmp}/{tag}")) if resume else None

    class SigtermOnRank0(Callback):
        def on_step_end(self, state, metrics):
            if rank == 0 and state.step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

    try:
        amptrain.fit(model, pattern_blocks(40), pattern_blocks(8, seed=1), precision="fp32",
                     batch_size=4, max_steps=8, eval_every=4, checkpoint_dir=f"{tmp}/{tag}",
                     resume=ckpt, handle_signals=True, callbacks=[SigtermOnRank0()])  # fmt: skip
    except Interrupted as exc:
        torch.save({"step": exc.step}, f"{tmp}/{tag}-stopped-{rank}.pt")


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_and_resume_matches(tmp_path):
    _spawn("train", tmp_path, "straight", -1, False)
    _spawn("train", tmp_path, "cut", 3, False)
    stopped = [torch.load(tmp_path / f"cut-stopped-{r}.pt")["step"] for r in (0, 1)]
    # The signal reached rank 0 only, after step 3; the ranks agree on stopping at logging,
    # evaluation and checkpoint steps only (no collective between them): both stop at step 4.
    assert stopped == [4, 4]
    _spawn("train", tmp_path, "cut", -1, True)
    a = checkpoint.load(checkpoint.latest(tmp_path / "straight"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "cut"))
    assert a.trainer["step"] == b.trainer["step"] == 8 and b.trainer["world_size"] == 2
    for key, value in a.tensors["model"].items():
        assert torch.equal(value, b.tensors["model"][key]), key
    assert len(a.tensors["rng"]["ranks"]) == 2


def test_resume_with_another_world_size_keeps_the_global_batch(tmp_path):
    amptrain.fit(tiny_model(), pattern_blocks(16), precision="fp32", max_steps=2, batch_size=4,
                 checkpoint_dir=tmp_path, checkpoint_meta={})  # fmt: skip
    ckpt = checkpoint.load(checkpoint.latest(tmp_path))
    assert ckpt.trainer["batch_size"] == 4 and ckpt.trainer["world_size"] == 1
    ckpt.trainer["world_size"] = 2  # as if written by 2 processes of batch 4: global batch 8
    assert resharding.keep_global_batch(FitOptions(batch_size=4), ckpt, 1).batch_size == 8
    assert resharding.keep_global_batch(FitOptions(batch_size=2), ckpt, 4).batch_size == 2
    with pytest.raises(checkpoint.CheckpointError, match="global batch of 8 .*divides 8"):
        resharding.keep_global_batch(FitOptions(batch_size=4), ckpt, 3)
    del ckpt.trainer["batch_size"]  # written before checkpoints recorded it
    with pytest.raises(checkpoint.CheckpointError, match="written by 2 process.*--nproc 2"):
        resharding.keep_global_batch(FitOptions(batch_size=4), ckpt, 1)


def _case_compiled(rank, tmp):
    train, val = pattern_blocks(48), pattern_blocks(16, seed=1)
    model = tiny_model(seed=1)
    result = amptrain.fit(model, train, val, precision="fp32", batch_size=4, compile=True,
                          **COMMON)  # fmt: skip
    torch.save({"state": model.state_dict(), "result": result.to_dict()},
               f"{tmp}/compiled-{rank}.pt")  # fmt: skip


@pytest.mark.slow
def test_two_compiled_processes_match_one(tmp_path):
    _spawn("compiled", tmp_path)
    single = tiny_model(seed=1)
    train, val = pattern_blocks(48), pattern_blocks(16, seed=1)
    expected = amptrain.fit(single, train, val, precision="fp32", batch_size=8, compile=False,
                            **COMMON)  # fmt: skip
    got = [torch.load(tmp_path / f"compiled-{r}.pt", weights_only=True) for r in (0, 1)]
    assert got[0]["result"]["fast_path"]["compiled"]
    for name, param in single.state_dict().items():
        # the compiled step's stated tolerance (tests/test_compile.py): fused kernels reorder sums
        torch.testing.assert_close(got[0]["state"][name], param, atol=1e-4, rtol=1e-4)
        assert torch.equal(got[0]["state"][name], got[1]["state"][name])  # ranks agree
    assert got[0]["result"]["final_val_loss"] == pytest.approx(expected.final_val_loss, rel=1e-4)


def _case_ends_without_teardown(rank, tmp):
    atexit.register(Path(f"{tmp}/torn-down-{rank}").touch)
    Path(f"{tmp}/ran-{rank}").touch()


def test_a_worker_that_left_its_group_ends_without_interpreter_teardown(tmp_path):
    """gloo's threads outlive the group and can abort interpreter teardown (end_worker)."""
    assert distributed.end_worker(3) == 3  # this process never left a group: nothing happens
    _spawn("ends_without_teardown", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ran-0", "ran-1"]
