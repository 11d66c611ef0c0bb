from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import pattern_blocks, tiny_model
from torch import nn

from amptrain import _imports, capability
from amptrain.bench import ArmResult, bench, check_fair, default_precisions, train_once
from amptrain.bench.report import console_table, write_report
from amptrain.cli import main
from amptrain.errors import ConfigError, PrecisionError

QUICK = dict(steps=6, warmup=2, repeats=2, batch_size=8, lr=1e-2, eval_batches=2)
FIELDS = ("step_ms", "step_ms_iqr", "repeat_ms_range", "tokens_per_s", "train_loss", "val_loss",
          "val_accuracy", "loss_scale", "init_digest", "batch_digest", "mfu_probe")  # fmt: skip


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    return bench(tiny_model(), pattern_blocks(48), pattern_blocks(16, seed=1),
                 precisions=["bf16", "fp16"], memory=True, **QUICK)  # fmt: skip


def test_one_record_per_arm_with_every_figure(report):
    assert [a.precision for a in report.arms] == ["fp32", "bf16", "fp16"]
    for arm in report.arms:
        assert arm.status == "ok", arm.error
        for field in FIELDS:
            assert getattr(arm, field) is not None, field
        assert arm.step_ms > 0 and arm.step_ms_iqr[0] <= arm.step_ms <= arm.step_ms_iqr[1]
        assert arm.mem_mb is not None and arm.mem_source.startswith("process-rss")
        assert len(arm.loss_curve) == QUICK["steps"]
    fp16, bf16 = report.arm("fp16"), report.arm("bf16")
    for arm in (fp16, bf16):
        assert arm.speedup_vs_fp32 == pytest.approx(
            arm.tokens_per_s / report.arm("fp32").tokens_per_s
        )
        assert arm.val_loss_rel_diff is not None and arm.quality_ok is not None
        assert arm.allocator["allocator"] in ("kept", "system"), arm.allocator  # fit's record
        assert arm.allocator["allocator_reason"]
    assert fp16.loss_scale > 1 and fp16.scale_backoffs is not None
    assert set(report.targets) == {"fp16", "bf16"}
    assert report.environment["torch"] == torch.__version__
    assert report.settings["precisions"] == ["fp32", "bf16", "fp16"]


def test_arms_start_from_the_same_weights_and_batches(report):
    assert len({a.init_digest for a in report.arms}) == 1
    assert len({a.batch_digest for a in report.arms}) == 1


def test_the_fairness_check_sees_other_batches_or_weights():
    model, train, val = tiny_model(), pattern_blocks(48), pattern_blocks(16, seed=1)
    opts = dict(max_steps=3, batch_size=8, eval_every=3, eval_batches=1)
    a = train_once(model, train, val, "fp32", {**opts, "seed": 0})
    b = train_once(model, train, val, "fp32", {**opts, "seed": 0})
    c = train_once(model, train, val, "fp32", {**opts, "seed": 1})
    assert a.batch_digest == b.batch_digest != c.batch_digest
    assert (
        a.init_digest
        == c.init_digest
        != train_once(tiny_model(seed=9), train, val, "fp32", {**opts, "seed": 0}).init_digest
    )
    rows = [
        ArmResult("fp32", "ok", "", batch_digest=a.batch_digest, init_digest="x"),
        ArmResult("bf16", "ok", "", batch_digest=c.batch_digest, init_digest="x"),
    ]
    with pytest.raises(RuntimeError, match="differ in batch_digest"):
        check_fair(rows)


class Fragile(nn.Module):
    """A tiny GPT that fails, or produces garbage, under one autocast dtype."""

    def __init__(self, bad_dtype, mode):
        super().__init__()
        self.inner, self.bad_dtype, self.mode = tiny_model(), bad_dtype, mode

    def forward(self, ids):
        logits = self.inner(ids)
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == self.bad_dtype:
            if self.mode == "raise":
                raise RuntimeError("kernel not implemented for this dtype")
            return logits + 20 * torch.randn_like(logits)
        return logits


def test_an_arm_that_raises_is_a_failed_row_and_the_others_complete():
    out = bench(Fragile(torch.float16, "raise"), pattern_blocks(48), pattern_blocks(16, seed=1),
                precisions=["fp16", "bf16"], memory=False, **QUICK)  # fmt: skip
    assert out.arm("fp16").status == "failed"
    assert "kernel not implemented" in out.arm("fp16").error
    assert out.arm("fp32").status == out.arm("bf16").status == "ok"
    assert "FAILED" in str([c for c in console_table(out).columns[2].cells])


def test_corrupted_outputs_fail_the_quality_check_on_a_learnable_task():
    out = bench(Fragile(torch.bfloat16, "noise"), pattern_blocks(48), pattern_blocks(16, seed=1),
                precisions=["bf16"], memory=False, **{**QUICK, "steps": 12})  # fmt: skip
    fp32, bf16 = out.arm("fp32"), out.arm("bf16")
    first_loss = fp32.loss_curve[0]
    assert fp32.train_loss < 0.9 * first_loss  # the task is learnable: fp32 learned it
    assert bf16.quality_ok is False and bf16.val_loss_rel_diff > 0.02
    assert out.best == "fp32"


def test_report_files(report, tmp_path):
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [a["precision"] for a in saved["arms"]] == ["fp32", "bf16", "fp16"]
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert rows[0]["device"] == "cpu" and rows[0]["torch"] == torch.__version__
    assert rows[0]["threads"] and rows[0]["precisions"] == "fp32 bf16 fp16"
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict:**" in md and "speedup >= 1.5x" in md
    png = tmp_path / "bench.png"
    assert png.exists() == _imports.MATPLOTLIB_AVAILABLE
    if png.exists():
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="steps >= warmup"):
        bench(tiny_model(), pattern_blocks(16), pattern_blocks(8), steps=3, warmup=2)
    with pytest.raises(PrecisionError, match="tf32"):
        bench(tiny_model(), pattern_blocks(16), pattern_blocks(8), precisions=["tf32"])


def test_default_arms_on_cpu_are_fp32_and_what_this_cpu_does_not_emulate():
    caps = capability.probe("cpu")
    served = [p for p in ("fp16", "bf16") if not caps.emulated(p)]
    assert default_precisions(torch.device("cpu")) == ["fp32", *served]


def test_bench_command_writes_its_report(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh " * 400)
    code = main(["bench", "--data", str(corpus), "--layers", "1", "--width", "16", "--heads", "2",
                 "--context", "16", "--batch-size", "4", "--steps", "4", "--warmup-steps", "1",
                 "--repeats", "1", "--precisions", "bf16", "--no-memory", "--out",
                 str(tmp_path / "runs"), "--no-progress"])  # fmt: skip
    assert code == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert {"bench.json", "bench.csv", "report.md", "config.json"} <= {
        p.name for p in run.iterdir()
    }
    assert "verdict" in capsys.readouterr().out


@pytest.mark.gpu
def test_cuda_timing_is_synchronised_and_tf32_is_an_arm():
    model = tiny_model(n_embd=64, n_head=4).cuda()
    out = bench(model, pattern_blocks(64), pattern_blocks(16, seed=1), memory=True,
                **{**QUICK, "steps": 10})  # fmt: skip
    names = [a.precision for a in out.arms]
    if torch.cuda.get_device_capability()[0] >= 8:
        assert "tf32" in names and "bf16" in names
        assert out.arm("tf32").probe_tflops > out.arm("fp32").probe_tflops
    for arm in out.arms:
        assert arm.status == "ok" and arm.step_ms > 0
        assert arm.mem_source.startswith("cuda-allocator")


class Hog(nn.Module):
    """Asks for more GPU memory than there is, under bf16 autocast only."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()

    def forward(self, ids):
        if torch.is_autocast_enabled("cuda") and self.training:
            free, _ = torch.cuda.mem_get_info()
            torch.empty(int(free * 1.5), dtype=torch.uint8, device=ids.device)
        return self.inner(ids)


@pytest.mark.gpu
def test_an_out_of_memory_arm_is_an_oom_row_and_memory_returns():
    model = Hog().cuda()
    before = torch.cuda.memory_allocated()
    out = bench(model, pattern_blocks(48), pattern_blocks(16, seed=1), precisions=["bf16"],
                memory=False, **QUICK)  # fmt: skip
    assert out.arm("bf16").status == "oom" and "batch_size=8" in out.arm("bf16").error
    assert out.arm("fp32").status == "ok"  # the other arm still ran
    assert torch.cuda.memory_allocated() <= before + 2**20


def test_cuda_step_times_come_from_events_with_one_sync_at_the_end(monkeypatch):
    from amptrain.bench import StepClock

    syncs, now = [], iter([0.0, 0.5, 1.5, 1.75])

    class Event:  # a CUDA event: recorded on a stream, read after a synchronisation
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self, stream):
            self.t = next(now)

        def synchronize(self):
            syncs.append("event")

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3  # milliseconds, as torch gives them

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append("device"))
    clock = StepClock(torch.device("cuda", 0))
    for _ in range(4):
        clock.mark()
    assert syncs == []  # no synchronisation while training
    assert clock.intervals() == [0.5, 1.0, 0.25] and syncs == ["event"]
