"""FSDP2 and DDP checkpoints on CPU with gloo and 2 processes: sharded and full formats,
resuming on another number of processes or another strategy, and a signal mid-run.

Each spawned run combines several checks, since starting processes is the slow part.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import pattern_blocks, tiny_model
from spawning import spawn
from test_fsdp import assert_same_weights, fit_and_save

import amptrain
from amptrain import checkpoint, sharding


def _spawn(case, tmp_path, *args):
    spawn("test_fsdp_checkpoints", case, tmp_path, *args)


def _case_resume(rank, tmp):
    train, val = pattern_blocks(40), pattern_blocks(8, seed=1)
    kwargs = dict(precision="fp32", batch_size=4, max_steps=8, eval_every=4, eval_batches=1)
    fit_and_save(rank, f"{tmp}/straight.pt", tiny_model(seed=2), train, val,
                  checkpoint_dir=f"{tmp}/straight", checkpoint_every=4, **kwargs)  # fmt: skip
    ckpt = checkpoint.load(f"{tmp}/straight/step-000000004")
    fit_and_save(rank, f"{tmp}/resumed2.pt", tiny_model(seed=5), train, val, resume=ckpt,
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


def _shard_bytes(path):
    return sum(f.stat().st_size for f in (path / "shards").glob("*.distcp"))


@pytest.mark.slow
def test_checkpoint_formats_and_switching_strategy_on_resume(tmp_path):
    _spawn("formats", tmp_path)
    runs = {p.stem: torch.load(p, weights_only=True) for p in tmp_path.glob("*.pt")}
    reference = runs["ddp"]["state"]
    for name in ("ddp_full", "fsdp_full", "fsdp", "fsdp_from_full", "ddp_from_shards"):
        assert_same_weights(runs[name]["state"], reference)
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
        assert_same_weights(model.state_dict(), reference)
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
         "--batch-size", "2", "--max-steps", str(total), "--log-every", "1",
         "--eval-every", str(total // 2)],
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
