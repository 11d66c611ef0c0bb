from __future__ import annotations

import io
import json
import math

import pytest
import torch
from conftest import pattern_blocks, tiny_model
from torch import nn

from amptrain._imports import MATPLOTLIB_AVAILABLE
from amptrain.cli import main
from amptrain.doctor import Float32, doctor, wrap_fp32
from amptrain.errors import ConfigError, ModelError

OVERFLOW_KINDS = {
    "forward-overflow",
    "backward-overflow",
    "forward-nonfinite",
    "backward-nonfinite",
}


class Amplify(nn.Module):
    """Multiplies its input by 1e5: fine in fp32, inf in fp16."""

    def forward(self, x):
        return x * 1e5


class _BlowUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e6


class BlowUp(nn.Module):
    """Identity forward; multiplies the gradient by 1e6 on the way back."""

    def forward(self, x):
        return _BlowUp.apply(x)


class Cancel(nn.Module):
    """x + 1e4 - 1e4: exact in fp32, rounds x to multiples of 8 (fp16) or 64 (bf16)."""

    def forward(self, x):
        return (x + 1e4) - 1e4


class Net(nn.Module):
    """Embedding -> Linear -> `mid` -> LayerNorm -> Linear: `mid` sees fp16 under autocast."""

    def __init__(self, mid: nn.Module, vocab: int = 32, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, width)
        self.mid = mid
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(self.norm(self.mid(self.fc(self.emb(ids)))))


@pytest.fixture(scope="module")
def data():
    return pattern_blocks(32)


def kinds(report):
    return {f.kind for f in report.findings}


def test_forward_overflow_names_exactly_the_amplifying_layer(data):
    report = doctor(Net(Amplify()), data, batches=1)
    assert report.overflowing("forward") == ["mid"]
    assert report.layer("mid").act_absmax > 65504 > report.layer("fc").act_absmax
    assert report.nonfinite("fp16").forward == "mid"
    (finding,) = [f for f in report.findings if f.kind == "forward-overflow"]
    assert finding.module == "mid" and finding.severity == "error"
    assert "fp32" in finding.advice and "bf16" in finding.advice
    assert report.nonfinite("bf16").forward is None  # bf16 has fp32's range


def test_gradient_blow_up_is_named_in_the_backward_pass(data):
    report = doctor(Net(BlowUp()), data, batches=1)
    assert report.overflowing("forward") == []
    assert report.overflowing("backward")[0] == "mid"
    assert report.nonfinite("fp16").backward == "mid"
    (finding,) = [f for f in report.findings if f.kind == "backward-overflow"]
    assert finding.module == "mid" and "--init-scale" in finding.advice


def test_healthy_model_has_no_overflow_findings(data):
    report = doctor(tiny_model(), data, batches=2)
    assert not kinds(report) & OVERFLOW_KINDS
    assert report.overflowing("forward") == report.overflowing("backward") == []
    assert all(f.forward is None and f.backward is None for f in report.first_nonfinite)
    assert min(r.act_headroom_bits for r in report.layers) > 2
    assert report.verdict.startswith("no overflow")
    assert {r.name for r in report.layers} >= {"(model)", "wte", "blocks.0.mlp.0", "lm_head"}


def test_divergence_ranks_the_cancelling_layer_first(data):
    report = doctor(Net(Cancel()), data, batches=1)
    for precision in ("fp16", "bf16"):
        first, second = report.ranking(precision)[:2]
        assert first.module == "mid" and first.error > 0.5
        assert second.error < 0.05  # fed fp32's inputs, the layers after it are fine
    assert any(f.kind == "divergence" and f.module == "mid" for f in report.findings)


class NormThenInPlace(nn.Module):
    """A LayerNorm output (fp32 under autocast) that the parent then modifies in place."""

    def __init__(self, vocab: int = 32, width: int = 16) -> None:
        super().__init__()
        self.emb, self.norm = nn.Embedding(vocab, width), nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(torch.relu_(self.norm(self.emb(ids))))


def test_in_place_ops_leave_the_fp32_reference_intact(data):
    report = doctor(NormThenInPlace(), data, batches=1, precisions=["fp16", "bf16"])
    for precision in ("fp16", "bf16"):  # bf16 runs after fp16 against the same reference
        assert report.ranking(precision)[0].error < 0.05


def test_audit_flags_a_half_model_under_fp16_amp(data):
    half = doctor(tiny_model().half(), data, batches=1, precision="fp16", precisions=["fp16"])
    (finding,) = [f for f in half.findings if f.kind == "half-model"]
    assert finding.severity == "error" and "Attempting to unscale FP16 gradients" in finding.message
    assert set(half.audit.param_dtypes) == {"float16"}
    sound = doctor(tiny_model(), data, batches=1, precision="fp16", precisions=["fp16"])
    assert "half-model" not in kinds(sound) and sound.audit.step_error is None
    a = sound.audit
    assert a.scaler_enabled and a.loss_scale == 65536.0 and set(a.matmul_dtypes) == {"float16"}
    assert set(a.grad_dtypes) == set(a.optimizer_state_dtypes) == {"float32"}


def test_audit_flags_autocast_that_lowers_nothing(data):
    model = wrap_fp32(tiny_model(), ["blocks.0", "blocks.1", "lm_head"])
    report = doctor(model, data, batches=1, precision="bf16", precisions=["bf16"])
    assert "autocast-inactive" in kinds(report)
    assert set(report.audit.matmul_dtypes) == {"float32"}


def test_fix_makes_the_overflowing_fp16_forward_finite(data):
    model = Net(Amplify())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = doctor(model, data, batches=1, fix=True)
    fix = report.fix
    assert fix.wrapped == ("mid",) and fix.forward_before == "mid" and fix.forward_after is None
    assert math.isnan(fix.loss_fp16_before)
    assert fix.loss_fp16_after == pytest.approx(fix.loss_fp32, rel=1e-2)
    fixed = report.fixed_model
    assert isinstance(fixed.mid, Float32) and isinstance(model.mid, Amplify)
    x = data.inputs[:4]
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isfinite(fixed(x)).all() and not torch.isfinite(model(x)).all()
    # The user's model is untouched: same weights, no gradients, no hooks left behind.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bad_settings_are_refused_before_any_pass(data):
    with pytest.raises(ConfigError, match="precisions"):
        doctor(tiny_model(), data, precisions=["fp32"])
    with pytest.raises(ConfigError, match="batches=0"):
        doctor(tiny_model(), data, batches=0)
    with pytest.raises(ModelError, match="not a module"):
        wrap_fp32(tiny_model(), ["blocks.7"])


def test_cli_doctor_writes_the_report(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    out = tmp_path / "runs"
    args = ["doctor", "--data", str(corpus), "--layers", "1", "--width", "32", "--heads", "2",
            "--context", "32", "--batch-size", "4", "--batches", "1", "--fix", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    (run,) = out.iterdir()
    assert run.name.startswith("doctor-")
    names = {p.name for p in run.iterdir()}
    assert {"doctor.json", "report.md", "config.json"} <= names
    saved = json.loads((run / "doctor.json").read_text())
    assert saved["settings"]["precisions"] == ["fp16", "bf16"] and saved["fix"]["wrapped"] == []
    assert {r["name"] for r in saved["layers"]} >= {"wte", "blocks.0.qkv", "lm_head"}
    assert "fixed_model" not in saved
    assert set(saved["audit"]["probe"]["tflops"]) == {"fp32", "bf16", "fp16"}
    assert "## fp16 headroom per module" in (run / "report.md").read_text()
    assert "| precision | matmul TFLOP/s | vs fp32 | here |" in (run / "report.md").read_text()
    if MATPLOTLIB_AVAILABLE:
        assert (run / "headroom.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "fp16 headroom" in printed and str(run / "report.md") in printed
    assert "matmul probe on" in printed


def test_the_tables_fit_80_columns_with_one_line_a_module():
    from rich.console import Console

    from amptrain.doctor.records import console_tables, short_name

    model = tiny_model()
    report = doctor(model, pattern_blocks(8), ["bf16"], batches=1, batch_size=4)
    console = Console(width=80, record=True, file=io.StringIO())
    for table in console_tables(report, rows=len(report.layers)):  # every module shown
        console.print(table)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    for row in report.layers:
        assert any(f"{short_name(row.name)} (" in line for line in lines), row.name
    long = "transformer.h.11.attn.c_attn"
    assert len(short_name(long)) == 26 and short_name(long).endswith("11.attn.c_attn")
