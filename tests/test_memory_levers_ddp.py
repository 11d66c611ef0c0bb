"""The memory levers on two DDP processes train as one process with the same global batch.

bf16 weights reduce their bf16 gradients in fp32 (`low_weights.fp32_allreduce`); each rank
rounds its half of the batch's gradient to bf16 where one process rounds the whole, so the
weights agree to bf16 rounding, not bit for bit. 8-bit AdamW state steps replicated fp32
gradients on every rank, so it agrees as closely as fp32 itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from amptrain.cli import main

TINY = ["--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--device", "cpu",
        "--no-progress", "--no-compile", "--eval-batches", "1", "--max-steps", "4",
        "--lr", "1e-2", "--eval-every", "4"]  # fmt: skip


def _two_and_one(tmp_path, corpus, lever):
    for name, extra in (("two", ["--batch-size", "2", "--nproc", "2"]),
                        ("one", ["--batch-size", "4"])):  # fmt: skip
        assert main(["train", "--data", str(corpus), *TINY, *lever, *extra,
                     "--out", str(tmp_path / name)]) == 0  # fmt: skip
    runs = [next((tmp_path / name).glob("train-*")) for name in ("two", "one")]
    weights = [load_file(run / "model.safetensors") for run in runs]
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    return weights, summaries


def _gap(two, one):
    return max(float((two[name] - one[name]).abs().max()) for name in one)


@pytest.mark.slow
@pytest.mark.parametrize("compensation", ["kahan", "sr"])
def test_bf16_true_on_two_ddp_processes_matches_one(tmp_path, corpus, compensation):
    """As close as bf16 autocast's own two processes are to one: each rank rounds its half of
    the gradient to bf16, which moves a few AdamW steps of lr 1e-2 either way."""
    pytest.importorskip("optimi")
    flags = ["--precision", "bf16-true", "--compensation", compensation]
    (two, one), (s_two, s_one) = _two_and_one(tmp_path / "true", corpus, flags)
    assert s_two["fast_path"]["gradient_reduction"] == "fp32"
    autocast, _ = _two_and_one(tmp_path / "autocast", corpus, ["--precision", "bf16"])
    assert _gap(two, one) <= 4 * _gap(*autocast)  # 0.017-0.032 against 0.012 here
    assert s_two["final_val_loss"] == pytest.approx(s_one["final_val_loss"], rel=0.01)


@pytest.mark.slow
def test_8bit_state_on_two_ddp_processes_matches_one(tmp_path, corpus):
    pytest.importorskip("bitsandbytes")
    (two, one), (s_two, _) = _two_and_one(
        tmp_path, corpus, ["--precision", "fp32", "--optimizer-state", "8bit"]
    )
    assert s_two["fast_path"]["optimizer_impl"] == "bitsandbytes 8-bit"
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_two_processes_agree_on_a_measured_micro_batch(tmp_path, corpus):
    (two, one), (s_two, _) = _two_and_one(
        tmp_path, corpus, ["--precision", "fp32", "--micro-batch", "auto"]
    )
    plan = s_two["fast_path"]["memory_plan"]
    assert plan["micro_batch"] * plan["grad_accum"] == 2  # each process's batch, as asked
    assert plan["budget_from"] == "the device's memory less 10%"
