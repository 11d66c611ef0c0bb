from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import pattern_blocks, tiny_model
from torch.amp.grad_scaler import OptState

import amptrain
from amptrain import loop
from amptrain.callbacks import Callback
from amptrain.config import FitOptions
from amptrain.errors import ConfigError, DataError, NonFiniteError
from amptrain.metrics import MemorySink
from amptrain.optim import lr_factor

FAST = dict(batch_size=8, eval_every=5, eval_batches=2, lr=3e-3, log_every=1)
STEP_KEYS = {"step", "train/loss", "train/lr", "train/grad_norm", "amp/loss_scale",
             "amp/skipped_steps", "perf/tokens_per_s", "perf/step_time_s", "mem/peak_mb",
             "mem/source"}  # fmt: skip


def test_fit_logs_every_metric_name_with_sane_values(model, train_val):
    sink = MemorySink()
    result = amptrain.fit(model, *train_val, precision="fp32", sinks=[sink], max_steps=6, **FAST)
    steps = [r for r in sink.records if "train/loss" in r]
    evals = [r for r in sink.records if "val/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [0, 5, 6]
    for record in steps:
        assert set(record) == STEP_KEYS
        assert record["mem/source"] == "process-rss"
        numbers = [v for v in record.values() if not isinstance(v, str)]
        assert all(math.isfinite(v) and v >= 0 for v in numbers)
    assert set(evals[0]) == {"step", "val/loss", "val/perplexity", "val/accuracy"}
    assert 0 <= evals[-1]["val/accuracy"] <= 1
    assert result.final_val_loss < result.initial_val_loss
    assert result.history == tuple(sink.records)


def _record_calls(monkeypatch, prec, model):
    calls = []
    scaler = prec.scaler
    for name in ("scale", "unscale_", "update"):
        original = getattr(scaler, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(scaler, name, spy)
    clip = torch.nn.utils.clip_grad_norm_

    def clip_spy(params, *args, **kwargs):
        opt_states = scaler._per_optimizer_states.values()
        assert all(s["stage"] is OptState.UNSCALED for s in opt_states)  # clip sees unscaled
        calls.append("clip")
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    # The gradients are unscaled already, so the optimizer steps itself, skipping on the
    # scaler's found-inf verdict on the device (`step.step_unless`).
    first, step = next(model.parameters()), torch.optim.AdamW.step

    def step_spy(optimizer, *args, **kwargs):
        if any(p is first for g in optimizer.param_groups for p in g["params"]):  # not a probe
            calls.append("step")
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_spy)
    next(model.parameters()).register_hook(lambda g: calls.append("backward"))
    return calls


def test_fp16_step_order_with_a_real_cpu_grad_scaler(monkeypatch, model, train_val):
    prec = amptrain.resolve("fp16", "cpu")
    calls = _record_calls(monkeypatch, prec, model)
    # attention="default": no start-of-run backend measurement, whose backward passes the
    # recorded hook would count as steps
    amptrain.fit(model, train_val[0], precision=prec, max_steps=2, grad_accum=2, batch_size=4,
                 attention="default", compile=False)  # fmt: skip
    one_step = ["scale", "backward", "scale", "backward", "unscale_", "clip", "step", "update"]
    assert calls == one_step * 2


class InjectInf(Callback):
    """Turns every gradient of one parameter to inf during the steps in `bad_steps`."""

    def __init__(self, model, bad_steps):
        self.bad_steps, self.snapshots, self.state = set(bad_steps), {}, None
        self.model = model
        self.param = next(model.parameters())
        self.param.register_hook(self._hook)

    def _hook(self, grad):
        if self.state is not None and self.state.step + 1 in self.bad_steps:
            return torch.full_like(grad, math.inf)
        return grad

    def on_fit_start(self, state):
        self.state = state

    def on_step_end(self, state, metrics):
        self.snapshots[state.step] = [p.detach().clone() for p in self.model.parameters()]


@pytest.mark.parametrize("precision", ["fp16", "fp32", "bf16"])
def test_injected_inf_gradient_skips_the_step_cleanly(precision, model, train_val):
    inject = InjectInf(model, bad_steps={3})
    sink = MemorySink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Detected call of lr_scheduler.step() before..."
        result = amptrain.fit(
            model, train_val[0], precision=precision, sinks=[sink], callbacks=[inject],
            max_steps=5, batch_size=8, warmup=0.5, log_every=1,
        )  # fmt: skip
    before, after = inject.snapshots[2], inject.snapshots[3]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # bitwise unchanged
    assert not all(torch.equal(a, b) for a, b in zip(after, inject.snapshots[4]))
    by_step = {r["step"]: r for r in sink.records if "train/loss" in r}
    assert by_step[3]["amp/skipped_steps"] == 1 and by_step[2]["amp/skipped_steps"] == 0
    assert math.isinf(by_step[3]["train/grad_norm"])
    # the scheduler did not advance on the skipped step: step 4 uses step 3's lr
    assert by_step[4]["train/lr"] == by_step[3]["train/lr"] > by_step[2]["train/lr"]
    assert result.skipped_steps == 1
    if precision == "fp16":
        assert by_step[3]["amp/loss_scale"] == by_step[2]["amp/loss_scale"] / 2
    else:
        assert by_step[3]["amp/loss_scale"] == 1.0


def test_a_skipped_step_leaves_the_optimizer_count_alone(monkeypatch, model, train_val):
    calls = []
    original = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        # only the model's optimizer (make_optimizer also steps a one-element probe to ask
        # torch whether its fused kernel takes these parameters)
        if any(p is first for g in self.param_groups for p in g["params"]):
            calls.append(self.state[next(iter(self.state))]["step"].item() if self.state else 0)
        return original(self, *args, **kwargs)

    first = next(model.parameters())

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    inject = InjectInf(model, bad_steps={2})
    amptrain.fit(model, train_val[0], precision="fp16", callbacks=[inject], max_steps=4,
                 batch_size=8)  # fmt: skip
    # 4 boundaries, 1 skipped: the fused kernel is called on every step (no host read decides)
    # and skips the update on the device, its step count included: 1 twice, never a jump
    assert calls == [0, 1, 1, 2]


def test_persistent_nonfinite_stops_with_the_story(model, train_val):
    inject = InjectInf(model, bad_steps=range(3, 100))
    with pytest.raises(NonFiniteError) as err:
        amptrain.fit(model, train_val[0], precision="fp16", callbacks=[inject], max_steps=50,
                     batch_size=8, max_nonfinite=4, log_every=1)  # fmt: skip
    message = str(err.value)
    assert "4 consecutive non-finite steps (steps 3-6)" in message
    assert "loss scale fell to 4096" in message  # 65536 / 2**4
    assert "at step 2" in message
    assert isinstance(err.value, RuntimeError)


def test_accumulation_matches_one_big_batch_in_fp32(train_val):
    train = pattern_blocks(48)
    common = dict(precision="fp32", max_steps=4, lr=1e-2, warmup=0.25)
    big, small = tiny_model(seed=1), tiny_model(seed=1)
    a = amptrain.fit(big, train, batch_size=8, grad_accum=1, **common)
    b = amptrain.fit(small, train, batch_size=4, grad_accum=2, **common)
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
    lrs = [[r["train/lr"] for r in res.history if "train/lr" in r] for res in (a, b)]
    assert lrs[0] == lrs[1]


def test_fp32_and_bf16_runs_of_one_seed_end_close(train_val):
    results = {}
    for precision in ("fp32", "bf16"):
        model = tiny_model(seed=2)
        results[precision] = amptrain.fit(model, *train_val, precision=precision,
                                          max_steps=60, **{**FAST, "lr": 1e-2})  # fmt: skip
    fp32, bf16 = results["fp32"], results["bf16"]
    assert fp32.final_val_loss < 0.8 * fp32.initial_val_loss  # it learned something
    assert abs(bf16.final_val_loss - fp32.final_val_loss) / fp32.final_val_loss < 0.05


def test_same_seed_gives_bitwise_equal_runs(train_val):
    runs = []
    for _ in range(2):
        model = tiny_model(seed=3, dropout=0.1)
        result = amptrain.fit(model, *train_val, precision="fp32", max_steps=4, **FAST)
        runs.append(([r for r in result.history if "train/loss" in r], model.state_dict()))
    losses = [[r["train/loss"] for r in h] for h, _ in runs]
    assert losses[0] == losses[1]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_grad_norm_is_unscaled_and_pre_clip(train_val):
    norms = {}
    for precision in ("fp32", "fp16"):
        model = tiny_model(seed=4)
        res = amptrain.fit(model, train_val[0], precision=precision, max_steps=1, batch_size=8,
                           clip_norm=1e-3)  # fmt: skip
        norms[precision] = res.history[-1]["train/grad_norm"]
    assert norms["fp32"] > 1e-3  # logged before clipping
    assert norms["fp16"] == pytest.approx(norms["fp32"], abs=1e-3)  # unscaled: F13 tolerance


def test_token_ids_beyond_the_vocabulary_fail_before_training(model):
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    bad = pattern_blocks(8)
    bad.inputs[3, 5] = 99
    with pytest.raises(DataError, match=r"token id 99 at \(row 3, position 5\).*\[0, 32\)"):
        amptrain.fit(model, bad, precision="fp32", max_steps=2, batch_size=4)
    assert forwards == [1]  # only the dry-run probe on token 0 ran


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", 0.0),
        ("lr", math.nan),
        ("batch_size", 0),
        ("grad_accum", 0),
        ("max_steps", -1),
        ("warmup", 1.0),
        ("clip_norm", -1.0),
        ("weight_decay", math.inf),
        ("max_nonfinite", 0),
    ],
)
def test_bad_options_are_refused_by_name_before_anything_runs(field, value, train_val):
    model = tiny_model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=f"{field}="):
        amptrain.fit(model, train_val[0], **{field: value})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_warmup_then_cosine_schedule_in_optimizer_steps():
    opts = FitOptions(max_steps=100, warmup=0.1, min_lr_ratio=0.1)
    assert lr_factor(0, opts) == pytest.approx(1 / 11)
    assert lr_factor(9, opts) == pytest.approx(10 / 11)
    assert lr_factor(10, opts) == pytest.approx(1.0)
    assert lr_factor(55, opts) == pytest.approx(0.55)
    assert lr_factor(100, opts) == pytest.approx(0.1)


def test_a_callback_can_stop_training_early(model, train_val):
    class StopAt2(Callback):
        def on_step_end(self, state, metrics):
            state.should_stop = state.step >= 2

    result = amptrain.fit(model, *train_val, precision="fp32", callbacks=[StopAt2()],
                          max_steps=10, **FAST)  # fmt: skip
    assert result.steps == 2
    assert result.history[-1]["step"] == 2 and "val/loss" in result.history[-1]


def test_evaluate_restores_training_mode_and_grad_state(model, train_val):
    prec = amptrain.resolve("bf16", "cpu")
    model.train()
    metrics = loop.evaluate(model, train_val[1], prec, batch_size=4)
    assert model.training and torch.is_grad_enabled()
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]))


def test_loss_scale_follows_growth_and_backoff_exactly(model, train_val):
    """F9: with growth_interval=1, scale = init * growth**unskipped * backoff**skipped."""
    inject = InjectInf(model, bad_steps={2, 5})
    result = amptrain.fit(model, train_val[0], precision="fp16", callbacks=[inject], max_steps=6,
                          batch_size=8, init_scale=256.0, growth_factor=2.0, backoff_factor=0.25,
                          growth_interval=1, log_every=1)  # fmt: skip
    assert result.skipped_steps == 2
    assert result.loss_scale == 256.0 * 2.0**4 * 0.25**2
    scales = [r["amp/loss_scale"] for r in result.history if "amp/loss_scale" in r]
    assert scales == [512.0, 128.0, 256.0, 512.0, 128.0, 256.0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("growth_factor", 1.0),
        ("backoff_factor", 1.0),
        ("backoff_factor", 0.0),
        ("growth_interval", 0),
        ("init_scale", math.inf),
    ],
)
def test_bad_scaler_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"{field}="):
        FitOptions(**{field: value})
