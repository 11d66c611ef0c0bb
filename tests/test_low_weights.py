"""bf16 weights (`--precision bf16-true`): the matrices in bf16, embeddings and norms in fp32;
Kahan-compensated updates keep what nearest rounding drops; the run trains, records what was
kept, and resumes bit for bit; where it cannot apply it is refused before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import pattern_blocks, tiny_model
from torch import nn

import amptrain
from amptrain.cli import main
from amptrain.config import FitOptions
from amptrain.errors import ConfigError
from amptrain.optim import make_optimizer

pytest.importorskip("optimi")


def _lost_updates(compensation: str, steps: int = 200, state: str = "32bit") -> float:
    """How far bf16 weights of 1.0 move, on average, under `steps` AdamW updates of about 1e-4.

    At 1.0 a bf16 step is 2**-7 (0.0078): nearest rounding drops every update of 1e-4.
    Stochastic rounding moves a weight by whole steps, about 2.6 of them in 200 updates, so
    the mean over 4,096 weights is what shows whether the updates were kept.
    """
    layer = nn.Linear(64, 64, bias=False)
    layer.weight.data = torch.ones(64, 64, dtype=torch.bfloat16)
    opts = FitOptions(lr=1e-4, weight_decay=0.0, weights="bf16", compensation=compensation,
                      optimizer_state=state)  # fmt: skip
    optimizer = make_optimizer(layer, opts)
    for _ in range(steps):
        layer.weight.grad = torch.ones_like(layer.weight)  # Adam's update: about lr a step
        optimizer.step()
    return 1.0 - float(layer.weight.detach().double().mean())


@pytest.mark.parametrize("compensation, state", [("kahan", "32bit"), ("sr", "32bit"),
                                                 ("sr", "8bit")])  # fmt: skip
def test_compensated_updates_keep_what_nearest_rounding_drops(compensation, state):
    assert _lost_updates("none") == 0.0  # every update rounded away
    moved = _lost_updates(compensation, state=state)
    assert moved == pytest.approx(200 * 1e-4, rel=0.05)  # the 200 updates kept


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    from amptrain.stochastic_round import round_stochastic

    gen = torch.Generator().manual_seed(0)
    value = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way from 1 to the next bf16
    noise = torch.randint(0, 2**16, value.shape, dtype=torch.int32, generator=gen)
    rounded = round_stochastic(value, noise)
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert float(rounded.double().mean()) == pytest.approx(1.0 + 2**-9, abs=2e-5)
    assert float(round_stochastic(-value, noise).double().mean()) == pytest.approx(
        -(1.0 + 2**-9), abs=2e-5)  # fmt: skip
    exact = torch.randn(1000).bfloat16().float()
    assert torch.equal(round_stochastic(exact, noise[:1000]).float(), exact)


def test_bf16_weights_train_with_embeddings_and_norms_in_fp32():
    model = tiny_model(n_layer=2, n_embd=32)
    result = amptrain.fit(model, pattern_blocks(48), pattern_blocks(16, seed=1),
                          precision="bf16-true", max_steps=30, batch_size=8, lr=1e-2,
                          eval_every=30, eval_batches=1, compile=False)  # fmt: skip
    assert result.final_val_loss < result.initial_val_loss
    assert result.fast_path["weights"] == "bf16"
    assert result.fast_path["optimizer_impl"] == "optimi, Kahan"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 again after
    kept = result.fast_path["kept_fp32"]
    layers = sum(p.numel() for n, p in model.named_parameters() if n not in kept)
    assert result.fast_path["bf16_parameters"] == layers  # tiny-gpt ties lm_head to wte
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert {n.rsplit(".", 1)[0] for n in kept} == norms | {"wte", "wpe"}
    assert any(n.endswith(".bias") and n not in kept for n, _ in model.named_parameters())
    assert result.fast_path["saved_weights"].startswith("fp32")


@pytest.mark.parametrize("compensation, state, held_key, held_dtype", [
    ("kahan", "32bit", "kahan_comp", torch.bfloat16), ("sr", "32bit", "exp_avg", torch.bfloat16),
    ("sr", "8bit", "exp_avg", torch.uint8)])  # fmt: skip
def test_a_bf16_true_run_resumes_bit_for_bit(tmp_path, corpus, compensation, state, held_key,
                                             held_dtype):  # fmt: skip
    out = tmp_path / "runs"
    flags = ["--layers", "2", "--width", "32", "--heads", "2", "--context", "16",
             "--batch-size", "4", "--device", "cpu", "--no-progress", "--no-compile",
             "--eval-batches", "1"]  # fmt: skip
    assert main(["train", "--data", str(corpus), "--precision", "bf16-true", "--max-steps", "6",
                 "--compensation", compensation, "--optimizer-state", state,
                 "--checkpoint-every", "3", "--eval-every", "3",
                 "--out", str(out), *flags]) == 0  # fmt: skip
    (run,) = out.glob("train-*")
    saved = json.loads((run / "config.json").read_text())
    assert saved["precision"] == "bf16" and saved["fit"]["weights"] == "bf16"
    assert saved["fit"]["compensation"] == compensation
    whole = (run / "model.safetensors").read_bytes()
    saved_state = run / "checkpoints" / "step-000000003" / "optimizer.pt"
    state = torch.load(saved_state, weights_only=True)
    held = [s[held_key] for s in state["state"].values() if held_key in s]
    assert any(t is not None and t.dtype == held_dtype for t in held)
    shutil.rmtree(run / "checkpoints" / "step-000000006")
    (run / "model.safetensors").unlink()
    assert main(["train", "--resume", str(run), "--out", str(out), "--no-progress"]) == 0
    assert (run / "model.safetensors").read_bytes() == whole


def test_accumulated_bf16_gradients_are_summed_in_fp32_and_rounded_once():
    from amptrain import low_weights

    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    layer = model[0]
    lowered = low_weights.cast(model, "bf16")
    lowered.accumulate_in_fp32()
    inputs = [torch.randn(8, 64, dtype=torch.bfloat16) * 100 for _ in range(3)]
    alone = []
    for x in inputs:  # each micro-batch's bf16 gradient by itself
        layer(x).square().sum().backward()
        lowered.gather()
        alone.append(layer.weight.grad.float())
        layer.weight.grad = None
    for x in inputs:  # the window: three backwards, then one gather
        layer(x).square().sum().backward()
        assert layer.weight.grad is None  # held aside in fp32
    lowered.gather()
    assert torch.equal(layer.weight.grad, sum(alone).bfloat16())
    summed_in_bf16 = (alone[0].bfloat16() + alone[1].bfloat16()) + alone[2].bfloat16()
    assert not torch.equal(layer.weight.grad, summed_in_bf16)  # what plain accumulation gives
    lowered.undo()
    assert layer.weight.dtype == torch.float32 and not layer.weight._post_accumulate_grad_hooks


def test_bf16_true_with_gradient_accumulation_trains_like_the_whole_batch():
    train, val = pattern_blocks(48), pattern_blocks(16, seed=1)
    common = dict(precision="bf16-true", max_steps=10, lr=1e-2, eval_every=10,
                  eval_batches=1, compile=False)  # fmt: skip
    torch.manual_seed(0)
    whole = amptrain.fit(tiny_model(n_layer=2, n_embd=32), train, val, batch_size=8, **common)
    torch.manual_seed(0)
    split = amptrain.fit(tiny_model(n_layer=2, n_embd=32), train, val, batch_size=4,
                         grad_accum=2, **common)  # fmt: skip
    assert split.fast_path["gradient_accumulation"] == "fp32 sums"
    assert split.final_val_loss == pytest.approx(whole.final_val_loss, rel=0.02)


@pytest.mark.parametrize("extra, said", [
    (dict(precision="fp32", weights="bf16"), "they need precision bf16"),
    (dict(precision="bf16-true", optimizer_state="8bit"), "8-bit AdamW state takes --compensat"),
    (dict(precision="bf16-true", optimizer_impl="fused"), "not --optimizer-impl fused"),
])  # fmt: skip
def test_bf16_weights_where_they_cannot_apply_are_refused(extra, said):
    model = tiny_model()
    with pytest.raises(ConfigError, match=said):
        amptrain.fit(model, pattern_blocks(16), pattern_blocks(8), max_steps=1, batch_size=4,
                     **extra)  # fmt: skip
    assert all(p.dtype == torch.float32 for p in model.parameters())  # nothing was cast


def test_a_bf16_true_model_trains_on_and_resumes_only_with_bf16_weights(tmp_path):
    from amptrain import checkpoint
    from amptrain.checkpoint import CheckpointError

    model, train, val = tiny_model(), pattern_blocks(32), pattern_blocks(8, seed=1)
    common = dict(max_steps=2, batch_size=4, eval_every=2, eval_batches=1, compile=False)
    amptrain.fit(model, train, val, precision="bf16-true", checkpoint_dir=tmp_path, **common)
    amptrain.fit(model, train, val, precision="bf16-true", **common)  # on its bf16 matrices
    ckpt = checkpoint.load(checkpoint.latest(tmp_path))
    with pytest.raises(CheckpointError, match="trained with bf16 weights and this run asks"):
        amptrain.fit(tiny_model(), train, val, precision="bf16", resume=ckpt,
                     **{**common, "max_steps": 4})  # fmt: skip


def test_a_resume_needs_the_optimizer_state_format_it_was_written_in():
    from types import SimpleNamespace

    from amptrain.checkpoint import CheckpointError
    from amptrain.preflight import check_state_format

    sr = FitOptions(weights="bf16", compensation="sr")
    older = SimpleNamespace(path="ckpt", trainer={"weights": "bf16"})  # no format recorded
    with pytest.raises(CheckpointError, match="predates this amptrain's layout"):
        check_state_format(older, sr, 1)
    check_state_format(SimpleNamespace(path="ckpt", trainer={}), FitOptions(), 1)  # unchanged
    sharded = SimpleNamespace(
        path="ckpt", trainer={"optimizer_format": "amptrain StochasticAdamW 2, 8-bit moments"}
    )
    check_state_format(sharded, FitOptions(strategy="fsdp", optimizer_state="8bit"), 2)
    sr8 = FitOptions(weights="bf16", compensation="sr", optimizer_state="8bit")
    check_state_format(sharded, sr8, 1)  # bf16 weights with SR and 8-bit: the same state
    with pytest.raises(
        CheckpointError,
        match="this run's optimizer is amptrain StochasticAdamW "
        "2, bf16 moments; resume with the options",
    ):
        check_state_format(sharded, sr, 1)  # 8-bit codes are not bf16 moments
    with pytest.raises(CheckpointError, match="resume with the strategy and number of processes"):
        check_state_format(sharded, FitOptions(strategy="fsdp", optimizer_state="8bit"), 1)
