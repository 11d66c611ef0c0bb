"""The chunked cross-entropy against `F.cross_entropy` on `.float()` logits, the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amptrain import losses
from amptrain.adapter import next_token_loss
from amptrain.losses import ChunkedCrossEntropy, next_token_cross_entropy

# Stated tolerance: the loss is an fp32 sum computed in a different order (chunked
# log-sum-exp), so it matches the reference to fp32 rounding of a sum of B*T terms.
LOSS_RTOL = 1e-5


def reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """What the plain loop computes: slice, upcast, F.cross_entropy (summed)."""
    flat = logits[:, :-1].float().reshape(-1, logits.size(-1))
    return F.cross_entropy(
        flat, labels[:, 1:].reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


def _both(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    a = logits.detach().clone().requires_grad_()
    b = logits.detach().clone().requires_grad_()
    ours, ref = (
        next_token_cross_entropy(a, labels, ignore_index),
        reference(b, labels, ignore_index),
    )
    ours.backward()
    ref.backward()
    return ours, ref, a.grad, b.grad


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows at a vocabulary of 7: the tests cross chunk borders and a partial one."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_and_gradient_match_the_reference(dtype, small_chunks):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 7) * 4).to(dtype)  # odd shapes: 15 rows in chunks of 3
    labels = torch.randint(0, 7, (3, 5))
    ours, ref, grad, ref_grad = _both(logits, labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=LOSS_RTOL, atol=0)
    # The gradient is written in the logits' dtype: equal to the fp32 reference rounded once.
    assert grad.dtype == dtype
    # The reference's gradient also comes back through `.float()` in the logits' dtype, so both
    # are the fp32 gradient rounded once; they differ at most in that rounding.
    torch.testing.assert_close(grad, ref_grad)


def test_ignored_positions_add_nothing(small_chunks):
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 7)
    labels = torch.randint(0, 7, (4, 6))
    labels[0, 2:] = -100
    labels[2, ::2] = -100
    ours, ref, grad, ref_grad = _both(logits, labels)
    torch.testing.assert_close(ours, ref, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(grad, ref_grad)
    assert grad[0, 1:].abs().sum() == 0  # positions predicting an ignored label
    assert grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_custom_ignore_index_and_fully_ignored_batch(small_chunks):
    logits = torch.randn(2, 4, 7, requires_grad=True)
    labels = torch.full((2, 4), 3)
    loss = next_token_cross_entropy(logits, labels, ignore_index=3)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad.abs().sum() == 0
    torch.testing.assert_close(loss, reference(logits, labels, 3))


def test_gradient_check_in_float64(small_chunks):
    torch.manual_seed(2)
    logits = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, -100, 3, 3, 1, -100, 5, 2])
    assert torch.autograd.gradcheck(
        lambda z: ChunkedCrossEntropy.apply(z, targets, -100), (logits,)
    )


def test_upstream_gradient_scales_the_result():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    (next_token_cross_entropy(logits, labels) * 0.25).backward()
    ref_logits = logits.detach().clone().requires_grad_()
    (reference(ref_logits, labels) * 0.25).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_under_bf16_autocast_the_loss_stays_fp32():
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 13)
    x = torch.randn(2, 6, 8)
    labels = torch.randint(0, 13, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        loss = next_token_loss(logits, labels)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference(logits, labels), rtol=LOSS_RTOL, atol=0)
    loss.backward()
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()


def test_evaluation_uses_the_same_loss():
    from amptrain import data
    from amptrain.models import TinyGPT
    from amptrain.precision import resolve
    from amptrain.step import evaluate

    torch.manual_seed(4)
    model = TinyGPT(vocab_size=32, n_layer=1, n_embd=16, n_head=2, block_size=8)
    ids = torch.randint(0, 32, (6, 8))
    blocks = data.as_blocks(ids, name="val")
    got = evaluate(model, blocks, resolve("fp32", "cpu"), batch_size=6)
    with torch.no_grad():
        want = reference(model(ids), ids).item() / (6 * 7)
    assert got["val/loss"] == pytest.approx(want, rel=1e-5)
