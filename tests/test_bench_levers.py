"""`amptrain bench` measures the memory levers: an arm is a precision with +-joined levers,
trained from the same weights on the same batches, compared with fp32, and the memory verdict
names the cheapest arm that keeps quality (and fits a budget, with the largest batch it fits)."""

from __future__ import annotations

import pytest
import torch
from conftest import pattern_blocks, tiny_model

from amptrain.bench import arm_names, arms, bench
from amptrain.errors import ConfigError, PrecisionError

pytest.importorskip("optimi")
pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")


def test_an_arm_is_a_precision_with_levers():
    assert arms.split("bf16-true+sr+8bit") == ("bf16-true", ["sr", "8bit"])
    assert arms.options_of("bf16-true+sr+8bit") == {"weights": "bf16", "compensation": "sr",
                                                     "optimizer_state": "8bit"}  # fmt: skip
    assert arms.autocast_of("bf16-true+sr") == "bf16"
    assert arms.options_of("bf16+ckpt") == {"activation_checkpointing": "full"}
    assert arms.is_lora("bf16+lora") and not arms.is_lora("bf16-true+sr")
    names, _ = arm_names(["BF16-true+kahan", "bf16+8bit"], CPU)
    assert names == ["fp32", "bf16-true+kahan", "bf16+8bit"]


@pytest.mark.parametrize("arm, said", [
    ("bf16+turbo", "unknown lever 'turbo'"),
    ("bf16+sr", r"sr is the compensation of bf16 weights; write bf16-true\+sr"),
    ("bf16-true+kahan+8bit", "8-bit AdamW state takes --compensation sr"),
    ("fp32-true", "not accepted"),
])  # fmt: skip
def test_an_arm_that_cannot_run_is_refused_before_any_work(arm, said):
    with pytest.raises((ConfigError, PrecisionError), match=said):
        arm_names([arm], CPU)


def test_the_lever_arms_train_alike_and_the_memory_verdict_names_the_cheapest():
    report = bench(tiny_model(n_layer=2, n_embd=32), pattern_blocks(48), pattern_blocks(16, seed=1),
                   precisions=["bf16"], steps=6, warmup=2, repeats=1, batch_size=8, lr=1e-2,
                   eval_batches=2, compile=False, levers=True, quality_tol=0.05,
                   memory_budget="4GiB")  # fmt: skip
    names = [a.precision for a in report.arms]
    assert names == ["fp32", "bf16", *arms.MEMORY_ARMS]
    for arm in report.arms:
        assert arm.status == "ok", (arm.precision, arm.error)
        assert arm.init_digest == report.arm("fp32").init_digest  # the same start, batches
        assert arm.batch_digest == report.arm("fp32").batch_digest
        assert arm.mem_mb is not None and arm.val_loss is not None
        assert arm.largest_batch is not None and arm.largest_batch >= 8
        assert arm.largest_depth == 32  # 16 x its 2 blocks, the most tried: 4 GiB holds them
    levers = {a.precision: a.levers for a in report.arms}
    assert levers["bf16-true+sr+8bit"]["optimizer_impl"] == "stochastic rounding, 8-bit moments"
    assert levers["bf16-true+kahan"]["weights"] == "bf16" and levers["bf16"]["weights"] == "fp32"
    assert levers["bf16+8bit"]["optimizer_impl"] == "bitsandbytes 8-bit"
    assert levers["bf16+ckpt"]["activation_checkpointing"] == "full"
    assert report.memory_verdict.startswith("memory: ")
    cheapest = min((a for a in report.arms if a.quality_ok), key=lambda a: a.mem_mb)
    assert f"memory: {cheapest.precision} keeps quality and fits 4GiB at batch 8" in (
        report.memory_verdict)  # fmt: skip
    assert report.settings["memory_budget"] == "4GiB"


def test_the_bench_command_takes_levers_and_a_budget(tmp_path, corpus):
    from amptrain.cli import main

    out = tmp_path / "runs"
    assert main(["bench", "--data", str(corpus), "--layers", "2", "--width", "32", "--heads",
                 "2", "--context", "16", "--batch-size", "4", "--device", "cpu", "--no-progress",
                 "--no-compile", "--precisions", "bf16-true+sr", "--steps", "4",
                 "--warmup-steps", "1", "--repeats", "1", "--eval-batches", "1",
                 "--memory-budget", "4GiB", "--out", str(out)]) == 0  # fmt: skip
    report = next(out.glob("bench-*/report.md")).read_text()
    assert "| bf16-true+sr |" in report and "largest batch in budget" in report
    assert "**Memory:** memory: " in report
