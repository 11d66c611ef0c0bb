"""The compiled step: one graph for forward and loss, the auto decision, no host reads."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CONTEXT, pattern_blocks, tiny_model

import amptrain
from amptrain import autocompile
from amptrain.autocompile import decide
from amptrain.compiling import eager_loss, fused_loss, unchunked_loss
from amptrain.models import ModelSpec, build_model

STYLES = Path(__file__).parent / "model_styles"
# Compiled and eager steps add the same terms in a different order (fused kernels): the
# stated tolerance for fp32 loss and gradients.
COMPILED_RTOL, COMPILED_ATOL = 1e-4, 1e-5


def _styles(tmp_path) -> dict[str, torch.nn.Module]:
    """The built-in model and every model style of tests/model_styles, tiny."""
    shutil.copytree(STYLES, tmp_path / "styles")
    root = tmp_path / "styles"
    small = {"n_layer": 2, "n_head": 2, "n_embd": 16}
    specs = {
        "nanogpt": ModelSpec(f"{root}/nanogpt_model.py:GPT", small),
        "mingpt": ModelSpec(f"{root}/mingpt/model.py:GPT", {"model_type": None, **small}),
        "llama-style": ModelSpec(f"{root}/llama_style.py:Transformer", {"dim": 16}),
    }
    models = {"tiny-gpt": tiny_model()}
    sys.path.insert(0, str(root))  # minGPT's model file imports `mingpt.utils`
    try:
        for name, spec in specs.items():
            models[name] = build_model(spec, 32, 8)
    finally:
        sys.path.remove(str(root))
    return models


@pytest.mark.slow
def test_zero_graph_breaks_for_the_built_in_model_and_every_style(tmp_path):
    ids = torch.randint(0, 32, (2, 8))
    for name, model in _styles(tmp_path).items():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fused_loss(model, -100, chunked=False))(model, ids, ids)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        assert explained.graph_count == 1, name


@pytest.fixture(scope="module")
def compiled_step():
    """One compiled forward+loss of the tiny model, shared by the tests that need inductor."""
    model = tiny_model()
    return model, torch.compile(fused_loss(model, -100, chunked=False))


@pytest.mark.slow
def test_compiled_and_eager_steps_agree(compiled_step):
    model, compiled = compiled_step
    ids = pattern_blocks(4).inputs
    grads = []
    losses = []
    for fn in (eager_loss(-100), compiled):
        model.zero_grad(set_to_none=True)
        loss = fn(model, ids, ids)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=COMPILED_RTOL, atol=COMPILED_ATOL)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=COMPILED_RTOL, atol=COMPILED_ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_compiled_steps_loss_equals_cross_entropy_on_fp32_logits(dtype):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11).to(dtype)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 2:4] = -100  # ignored positions
    ref = F.cross_entropy(logits[:, :-1].float().reshape(-1, 11), labels[:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")  # fmt: skip
    torch.testing.assert_close(unchunked_loss(logits, labels, -100), ref, rtol=1e-5, atol=0)


def test_auto_stays_eager_for_a_short_run_and_says_why():
    decision = decide(40, eager_step_s=0.05, recorded=None)
    assert not decision.compile
    assert decision.reason.startswith("eager: 40 steps x 0.05 s x 10% saved = 0.2 s < 60 s")
    assert decision.figures["compile_s_estimate"] == autocompile.COMPILE_GUESS_S


def test_auto_compiles_a_long_run_and_trusts_a_recorded_measurement():
    assert decide(2000, eager_step_s=0.5, recorded=None).compile  # 100 s saved >= 60 s
    fast = {"compile_s": 8.0, "eager_step_s": 0.1, "compiled_step_s": 0.08}
    decision = decide(500, eager_step_s=0.1, recorded=fast)
    assert decision.compile and "recorded by a previous run" in decision.reason
    assert decision.figures["saving_estimate"] == pytest.approx(0.2)
    slow = {**fast, "compiled_step_s": 0.12}
    assert not decide(10**6, eager_step_s=0.1, recorded=slow).compile


def test_a_compiled_step_measured_no_faster_goes_back_to_eager():
    decision = decide(2000, eager_step_s=0.5, recorded=None)
    kept = autocompile.confirm(decision, compile_s=30.0, compiled_step_s=0.4)
    dropped = autocompile.confirm(decision, compile_s=30.0, compiled_step_s=0.6)
    assert kept.compile and kept.figures["compile_s"] == 30.0
    assert not dropped.compile and "measured no faster" in dropped.reason


def test_a_short_run_by_default_is_eager_with_its_reason(train_val):
    result = amptrain.fit(tiny_model(), train_val[0], precision="fp32", max_steps=3,
                          batch_size=4)  # fmt: skip
    record = result.fast_path
    assert record["compiled"] is False and record["compile_reason"].startswith("eager: 3 steps")
    assert record["eager_step_s"] > 0 and "compile_s" not in record


class _HostReads:
    """Counts host reads of tensors (`item`, `tolist`, `bool`, `float`, `int`) while on."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch) -> None:
        self.on, self.count = False, 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def spy(tensor, *args, _original=original, **kwargs):
                self.count += self.on
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, spy)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_no_host_reads_on_non_logging_steps(monkeypatch, train_val, precision):
    from amptrain import loop

    reads = _HostReads(monkeypatch)
    per_step = []
    original = loop.train_step

    def counted(*args, **kwargs):
        reads.on, reads.count = True, 0
        return original(*args, **kwargs)

    add = loop.DeviceCounters.add

    def add_then_stop(self, out, step):
        add(self, out, step)
        per_step.append(reads.count)
        reads.on = False

    monkeypatch.setattr(loop, "train_step", counted)
    monkeypatch.setattr(loop.DeviceCounters, "add", add_then_stop)
    result = amptrain.fit(tiny_model(), train_val[0], precision=precision, max_steps=6,
                          batch_size=4, log_every=3, compile=False)  # fmt: skip
    assert len(per_step) == 6 and per_step == [0] * 6  # the step and its counters: no read
    logged = [r["step"] for r in result.history if "train/loss" in r]
    assert logged == [3, 6] and result.tokens == 6 * 4 * (CONTEXT - 1)
