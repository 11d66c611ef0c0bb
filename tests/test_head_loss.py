"""The fused head and loss against `F.cross_entropy` on `.float()` logits; the dry run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import pattern_blocks, tiny_model
from test_losses import LOSS_RTOL, reference
from torch import nn

import amptrain
from amptrain import head_loss
from amptrain.config import FitOptions
from amptrain.errors import ConfigError, ModelError
from amptrain.head_loss import UNFUSED, find_head, fused_next_token_loss, plan_loss
from amptrain.precision import resolve

FP32 = resolve("fp32", "cpu")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 rows: the tests cross chunk borders and end on a partial chunk."""
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 1)
    monkeypatch.setattr(head_loss, "MIN_CHUNK_ROWS", 4)


def _grads(loss_fn, hidden, head):
    h = hidden.detach().clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    loss = loss_fn(h)
    loss.backward()
    return loss.detach(), h.grad, [p.grad.clone() for p in head.parameters()]


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_loss_and_gradients_match_the_reference(bias, small_chunks):
    torch.manual_seed(0)
    head = nn.Linear(8, 13, bias=bias)
    hidden, labels = torch.randn(3, 6, 8) * 2, torch.randint(0, 13, (3, 6))  # 18 rows
    ours = _grads(lambda h: fused_next_token_loss(h, head, labels), hidden, head)
    ref = _grads(lambda h: reference(head(h), labels), hidden, head)
    torch.testing.assert_close(ours[0], ref[0], rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(ours[1], ref[1])  # d/d hidden
    for got, want in zip(ours[2], ref[2]):  # d/d weight (and bias)
        torch.testing.assert_close(got, want)


def test_ignored_positions_add_nothing(small_chunks):
    torch.manual_seed(1)
    head = nn.Linear(8, 11)
    hidden, labels = torch.randn(2, 7, 8), torch.randint(0, 11, (2, 7))
    labels[0, 3:] = -100
    ours = _grads(lambda h: fused_next_token_loss(h, head, labels), hidden, head)
    ref = _grads(lambda h: reference(head(h), labels), hidden, head)
    torch.testing.assert_close(ours[0], ref[0], rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(ours[1], ref[1])
    assert ours[1][0, 2:].abs().sum() == 0 and ours[1][:, -1].abs().sum() == 0


# Under autocast the fused loss projects in the low precision, as `head(hidden)` does, but
# keeps the logits of each chunk in fp32 where the unfused head rounds them to bf16/fp16
# first: against the fp32 loss of the rounded inputs it agrees to fp32 rounding; against the
# autocast reference, to the rounding of the logits (stated: 1e-2 relative).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_the_reference(dtype, small_chunks):
    torch.manual_seed(2)
    head = nn.Linear(8, 13)
    hidden, labels = torch.randn(2, 5, 8), torch.randint(0, 13, (2, 5))
    with torch.autocast("cpu", dtype=dtype):
        ours = _grads(lambda h: fused_next_token_loss(h, head, labels), hidden, head)
        autocast_ref = _grads(lambda h: reference(head(h), labels), hidden, head)
    rounded = nn.Linear(8, 13)
    with torch.no_grad():
        for dst, src in zip(rounded.parameters(), head.parameters()):
            dst.copy_(src.to(dtype).float())
    exact = reference(rounded(hidden.to(dtype).float()), labels)
    torch.testing.assert_close(ours[0], exact, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(ours[0], autocast_ref[0], rtol=1e-2, atol=0)
    assert ours[0].dtype == torch.float32 and ours[2][0].dtype == torch.float32
    for got, want in zip([ours[1], *ours[2]], [autocast_ref[1], *autocast_ref[2]]):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-3)


def test_tied_head_gets_the_gradient_of_both_uses():
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight  # the built-in GPT ties its head
    ids = pattern_blocks(4).inputs
    plan = plan_loss("fused", model, FP32, ids)
    assert plan.kind == "fused" and plan.head is model.lm_head
    got = {}
    for name, p in (("fused", plan), ("unfused", UNFUSED)):
        model.zero_grad(set_to_none=True)
        loss = p.forward_loss(model, ids, ids, -100)
        loss.backward()
        got[name] = loss.detach(), [q.grad.clone() for q in model.parameters()]
    torch.testing.assert_close(got["fused"][0], got["unfused"][0], rtol=LOSS_RTOL, atol=0)
    for a, b in zip(got["fused"][1], got["unfused"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _Scaled(nn.Module):
    """Post-processes its logits (as Gemma's soft-capping does): no head to fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids)) / 2


class _NoLinear(nn.Module):
    """Projects with the embedding matrix through `F.linear`: no `nn.Linear` head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(self.emb(ids), self.emb.weight)


class _Targets(nn.Module):
    """A nanoGPT-style forward that computes its own loss from the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None):
        return self.out(self.emb(ids)), None


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (_Scaled(), "post-processes the output of its head `out`"),
        (_NoLinear(), "no nn.Linear's output is the returned logits"),
        (_Targets(), "computes its own loss"),
    ],
)
def test_models_whose_head_cannot_be_fused_keep_the_unfused_loss(model, why):
    plan = plan_loss("fused", model, FP32, torch.zeros(2, 4, dtype=torch.long))
    assert plan.kind == "unfused" and plan.head is None
    assert why in plan.reason


class _ScaledInTraining(_Scaled):
    """Post-processes its logits in training mode only, which the dry run (eval) cannot see."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.out(self.emb(ids))
        return logits * 2 if self.training else logits


def test_post_processing_the_dry_run_missed_is_refused_in_the_step():
    model, ids = _ScaledInTraining(), torch.zeros(2, 4, dtype=torch.long)
    plan = plan_loss("fused", model, FP32, ids)
    assert plan.kind == "fused"
    with pytest.raises(ModelError, match="loss='unfused'"):
        plan.forward_loss(model.train(), ids, ids, -100)


def test_a_final_dtype_cast_counts_as_the_head(model_styles):
    # llama's reference model returns `self.output(h).float()`: under bf16 autocast a new
    # tensor, equal to the head's output cast; the loss computes in fp32 anyway.
    import llama_style

    torch.manual_seed(0)
    model = llama_style.Transformer(llama_style.ModelArgs(vocab_size=16, max_seq_len=8))
    ids = torch.randint(0, 16, (2, 8))
    for precision in ("fp32", "bf16"):
        head, name = find_head(model, resolve(precision, "cpu"), ids)
        assert head is model.output and name == "`output`"
    plan = plan_loss("fused", model, FP32, ids)
    torch.testing.assert_close(
        plan.forward_loss(model, ids, ids, -100), UNFUSED.forward_loss(model, ids, ids, -100)
    )


def test_auto_fuses_only_large_logits(monkeypatch):
    model, ids = tiny_model(), pattern_blocks(4).inputs
    small = plan_loss("auto", model, FP32, ids)
    assert small.kind == "unfused" and "MiB" in small.reason
    monkeypatch.setattr(head_loss, "FUSE_ABOVE_BYTES", 0)
    assert plan_loss("auto", model, FP32, ids).kind == "fused"  # 4 x 16 rows, width 16
    few_rows = plan_loss("auto", model, FP32, ids[:1, :8])
    assert few_rows.kind == "unfused" and "twice the head's width" in few_rows.reason
    assert plan_loss("auto", model, FP32, ids, compiled=True).kind == "unfused"
    assert plan_loss("unfused", model, FP32, ids).reason == "asked for (loss='unfused')"


def test_fit_with_the_fused_loss_trains_like_the_unfused_one():
    results, params = {}, {}
    for loss in ("fused", "unfused"):
        model = tiny_model()
        results[loss] = amptrain.fit(model, pattern_blocks(32), precision="fp32", max_steps=4,
                                     batch_size=4, loss=loss, log_every=1)  # fmt: skip
        params[loss] = [p.detach() for p in model.parameters()]
    assert results["fused"].fast_path["loss"] == "fused"
    assert results["unfused"].fast_path["loss"] == "unfused"
    assert "`lm_head`" in results["fused"].fast_path["loss_reason"]
    losses = {
        k: [r["train/loss"] for r in v.history if "train/loss" in r] for k, v in results.items()
    }
    assert losses["fused"] == pytest.approx(losses["unfused"], rel=1e-5)
    for a, b in zip(params["fused"], params["unfused"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fit_in_bf16_with_the_fused_loss_stays_within_a_percent_of_unfused():
    # bf16 is emulated on CPUs without AMX: two steps of the smallest model.
    losses = {}
    for loss in ("fused", "unfused"):
        result = amptrain.fit(tiny_model(), pattern_blocks(8), precision="bf16", max_steps=2,
                              batch_size=4, loss=loss, log_every=1)  # fmt: skip
        losses[loss] = [r["train/loss"] for r in result.history if "train/loss" in r]
    assert losses["fused"] == pytest.approx(losses["unfused"], rel=1e-2)


def test_an_unknown_loss_is_refused():
    with pytest.raises(ConfigError, match="loss"):
        FitOptions(loss="liger")


# On CUDA under autocast the projection runs in the autocast dtype with fp32 accumulation.
# torch's op runs that path on the CPU too (its "balanced" policy), so it is checked here.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_cuda_projection_runs_in_the_run_precision_within_the_loss_tolerance(
    dtype, small_chunks, monkeypatch
):
    torch.manual_seed(3)
    head = nn.Linear(8, 13)
    hidden, labels = torch.randn(2, 9, 8), torch.randint(0, 13, (2, 9))
    seen = []
    real = F.linear_cross_entropy
    monkeypatch.setattr(head_loss, "native_low_dtype", lambda device: dtype)

    def spy(h, w, *args, **kwargs):
        seen.append((h.dtype, w.dtype))
        return real(h, w, *args, **kwargs)

    monkeypatch.setattr(F, "linear_cross_entropy", spy)
    ours = _grads(lambda h: fused_next_token_loss(h, head, labels), hidden, head)
    assert seen == [(dtype, dtype)] and ours[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=dtype):
        ref = _grads(lambda h: reference(head(h), labels), hidden, head)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-2, atol=0)
    for got, want in zip([ours[1], *ours[2]], [ref[1], *ref[2]]):  # gradients held in bf16/fp16
        torch.testing.assert_close(got, want, rtol=5e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_the_cuda_projection_of_a_batch_with_nothing_scored_is_zero_with_finite_gradients(
    dtype, ignore_index, monkeypatch
):
    monkeypatch.setattr(head_loss, "native_low_dtype", lambda device: dtype)
    head = nn.Linear(8, 13)
    hidden, labels = torch.randn(2, 5, 8), torch.full((2, 5), ignore_index)
    loss, h_grad, p_grads = _grads(
        lambda h: fused_next_token_loss(h, head, labels, ignore_index), hidden, head
    )
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() for g in [h_grad, *p_grads])


def test_the_fp16_projection_survives_the_first_loss_scale(monkeypatch):
    # GradScaler's first scale is 65,536, past fp16's largest number: a scalar fp16 loss would
    # get it whole as its gradient. Per-row losses get it over the tokens.
    monkeypatch.setattr(head_loss, "native_low_dtype", lambda device: torch.float16)
    torch.manual_seed(4)
    head = nn.Linear(16, 50)
    hidden, labels = torch.randn(4, 64, 16), torch.randint(0, 50, (4, 64))
    h = hidden.clone().requires_grad_()
    loss = fused_next_token_loss(h, head, labels)
    (loss * 65536.0 / (4 * 63)).backward()  # the step's scaled, token-normalised loss
    assert torch.isfinite(h.grad).all() and torch.isfinite(head.weight.grad).all()


def test_the_projection_is_recorded_per_device_and_precision():
    import warnings

    from amptrain.precision import Precision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU build's fp16 scaler has no CUDA
        cuda = {p: Precision(p, torch.device("cuda"), "test") for p in ("bf16", "fp16", "fp32")}
    assert head_loss.projection(cuda["bf16"]).startswith("projection in bf16 with fp32 acc")
    assert head_loss.projection(cuda["fp16"]).startswith("projection in fp16 with fp32 acc")
    assert head_loss.projection(cuda["fp32"]) == "projection in fp32"
    assert "bf16-rounded inputs" in head_loss.projection(resolve("bf16", "cpu"))
    assert head_loss.native_low_dtype(torch.device("cpu")) is None


def test_a_torch_without_the_fused_op_keeps_the_unfused_loss(monkeypatch):
    monkeypatch.setattr(head_loss, "HAS_FUSED_OP", False)
    plan = plan_loss("fused", tiny_model(), FP32, pattern_blocks(4).inputs)
    assert plan.kind == "unfused" and "has no F.linear_cross_entropy" in plan.reason
