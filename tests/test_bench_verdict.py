"""The benchmark's figures cannot be wrong in plain sight: noise gives "inconclusive", MFU <= 1."""

from __future__ import annotations

import time

import torch
from conftest import pattern_blocks, tiny_model
from torch import nn

from amptrain import capability
from amptrain.bench import ArmResult, bench
from amptrain.bench.verdict import inseparable
from amptrain.capability import Capabilities

QUICK = dict(steps=8, warmup=1, repeats=1, batch_size=2, eval_batches=1, memory=False)


class Slowed(nn.Module):
    """A tiny GPT whose training forward sleeps: a fixed time, plus a jitter under autocast."""

    def __init__(self, base_s: float, jitter_s: float) -> None:
        super().__init__()
        self.inner, self.base_s, self.jitter_s, self.calls = (
            tiny_model(n_embd=8, n_head=1),
            base_s,
            jitter_s,
            0,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            noisy = torch.is_autocast_enabled("cpu") and self.calls % 2 == 0
            time.sleep(self.base_s + (self.jitter_s if noisy else 0.0))
        return self.inner(ids)


def test_a_noisy_arm_makes_the_verdict_inconclusive():
    report = bench(Slowed(0.005, 0.05), pattern_blocks(16), pattern_blocks(4), precisions=["bf16"],
                   **QUICK)  # fmt: skip
    assert report.best is None
    assert report.verdict.startswith("inconclusive: ")
    assert "rerun on a quieter machine" in report.verdict


def arm(name: str, median: float, iqr: tuple, repeats: tuple) -> ArmResult:
    return ArmResult(name, "ok", "", step_ms=median, step_ms_iqr=iqr, repeat_ms_range=repeats)


def test_overlapping_or_separated_ranges_decide_whether_arms_can_be_ranked():
    fp32 = arm("fp32", 100.0, (95.0, 105.0), (98.0, 104.0))
    fast = arm("bf16", 70.0, (68.0, 73.0), (69.0, 71.0))
    close = arm("bf16", 97.0, (94.0, 99.0), (96.0, 99.0))
    assert inseparable(fast, fp32) is None
    assert "overlap" in inseparable(close, fp32)
    assert "repeat medians" in inseparable(arm("bf16", 80, (79, 81), (80, 99)), fp32)


def test_mfu_stays_at_or_below_one_when_the_probe_under_reads(fake_probe, monkeypatch):
    fake_probe(Capabilities("cpu", "slow probe", (), {"fp32": 1e-9}, 1, (256,) * 3, 0.1))
    monkeypatch.setattr(capability, "matmul_tflops", lambda *args: 1e-9)
    model = tiny_model(n_embd=8, n_head=1)
    report = bench(model, pattern_blocks(8), pattern_blocks(4), precisions=["fp32"], **QUICK)
    row = report.arm("fp32")
    assert row.achieved_tflops > 1e-9
    assert row.mfu_probe == 1.0 and row.probe_tflops == row.achieved_tflops
    assert row.peak_source.startswith("training's own rate (the probe read 1e-09")
