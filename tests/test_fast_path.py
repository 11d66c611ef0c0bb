"""The step's kernels: fused AdamW by default, and the measured, scoped attention backend."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import pattern_blocks, tiny_model

import amptrain
from amptrain import attention
from amptrain.attention import AttentionPlan
from amptrain.config import FitOptions, TrainConfig
from amptrain.errors import ConfigError
from amptrain.optim import describe, impl_of, load_state_keeping_impl, make_optimizer
from amptrain.precision import resolve


def _params_after(impl: str, precision: str = "fp32", **options) -> list[torch.Tensor]:
    model = tiny_model()
    amptrain.fit(model, pattern_blocks(32), precision=precision, max_steps=3, batch_size=4,
                 optimizer_impl=impl, **options)  # fmt: skip
    return [p.detach() for p in model.parameters()]


def test_fit_uses_the_fused_adamw_by_default_and_records_it(model, train_val):
    result = amptrain.fit(model, train_val[0], precision="fp32", max_steps=1, batch_size=4)
    assert result.fast_path["optimizer_impl"] == "fused"
    assert "fused" in result.fast_path["optimizer_reason"]


@pytest.mark.parametrize("options", [{"grad_accum": 2, "clip_norm": 0.05}, {"clip_norm": None}])
def test_fused_adamw_trains_like_the_for_loop(options):
    # Same arithmetic in another order: equal to fp32 rounding, with clipping and accumulation.
    fused, loop = _params_after("fused", **options), _params_after("for-loop", **options)
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_step_through_the_scaler_skips_inf_gradients():
    model = torch.nn.Linear(4, 4)
    optimizer = make_optimizer(model, FitOptions())
    prec = resolve("fp16", "cpu")
    prec.backward(model(torch.ones(2, 4)).sum())
    model.weight.grad[0, 0] = math.inf
    before = [p.detach().clone() for p in model.parameters()]
    prec.unscale_(optimizer)
    prec.step(optimizer)  # the fused kernel reads the scaler's found-inf flag and does nothing
    prec.update()
    assert impl_of(optimizer) == "fused"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert prec.loss_scale == 65536.0 / 2


def test_resume_from_a_for_loop_checkpoint_stays_fused():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    old = make_optimizer(model, FitOptions(optimizer_impl="for-loop"))
    model(torch.randn(5, 4)).square().sum().backward()
    old.step()
    new = make_optimizer(model, FitOptions())
    new.load_state_dict(old.state_dict())
    assert impl_of(new) == "for-loop"  # what torch's load_state_dict alone does
    new = make_optimizer(model, FitOptions())
    load_state_keeping_impl(new, old.state_dict())
    assert impl_of(new) == "fused"
    new.step()  # the fused kernel accepts the restored step counters
    assert all(s["step"].item() == 2 for s in new.state.values())


def test_fused_unavailable_falls_back_with_its_reason_or_refuses_when_asked():
    model = torch.nn.Linear(4, 3, device="meta")  # a device without a fused kernel
    optimizer = make_optimizer(model, FitOptions())
    record = describe(optimizer)
    assert record["optimizer_impl"] == "for-loop"
    assert record["optimizer_reason"].startswith(
        "auto: no fused AdamW for torch.float32 parameters on meta"
    )
    with pytest.raises(ConfigError, match="optimizer_impl='fused' is not available here"):
        make_optimizer(model, FitOptions(optimizer_impl="fused"))
    with pytest.raises(ConfigError, match="optimizer_impl='fast' is invalid"):
        FitOptions(optimizer_impl="fast")


def test_train_run_config_records_the_fast_path(tmp_path):
    from amptrain.train import run_training

    cfg = TrainConfig(data="builtin", context=16, precision="fp32", device="cpu", out=str(tmp_path),
                      model_kwargs={"n_layer": 1, "n_embd": 16, "n_head": 2},
                      fit=FitOptions(max_steps=2, batch_size=2, eval_every=2,
                                     eval_batches=1))  # fmt: skip
    run = run_training(cfg)
    saved = json.loads((run.run_dir / "config.json").read_text())
    assert saved["environment"]["fast_path"]["optimizer_impl"] == "fused"
    assert saved["environment"]["fast_path"]["attention"] == "default"
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["fast_path"] == saved["environment"]["fast_path"]


def test_math_attention_is_scoped_to_the_step():
    flags = torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.math_sdp_enabled
    with AttentionPlan("math", "requested").context():
        assert not flags[0]() and flags[1]()
    assert flags[0]() and flags[1]()  # nothing left behind


def test_math_and_default_attention_train_alike(model, train_val):
    a = tiny_model()
    b = tiny_model()
    ra = amptrain.fit(
        a, train_val[0], precision="fp32", max_steps=3, batch_size=4, attention="math"
    )
    rb = amptrain.fit(b, train_val[0], precision="fp32", max_steps=3, batch_size=4)
    assert ra.fast_path["attention"] == "math" and rb.fast_path["attention"] == "default"
    assert ra.final_train_loss == pytest.approx(rb.final_train_loss, rel=1e-5)
    assert torch.backends.cuda.flash_sdp_enabled()


def test_auto_attention_is_measured_under_autocast_and_leaves_no_trace(model):
    sample = pattern_blocks(4).inputs
    rng = torch.get_rng_state()
    chosen = attention.plan("auto", model, resolve("bf16", "cpu"), sample, repeats=1)
    assert chosen.backend in ("default", "math") and chosen.reason.startswith("measured")
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    fp32 = attention.plan("auto", model, resolve("fp32", "cpu"), sample)
    assert fp32.backend == "default" and "only under autocast" in fp32.reason


def test_models_without_sdpa_keep_the_default():
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    chosen = attention.plan(
        "auto", model, resolve("bf16", "cpu"), torch.zeros(2, 4, dtype=torch.long)
    )
    assert chosen == AttentionPlan(
        "default", "the model does not call F.scaled_dot_product_attention"
    )


def test_compile_must_be_a_boolean_or_auto():
    with pytest.raises(ConfigError, match="compile='yes' is invalid"):
        FitOptions(compile="yes")


def test_a_resumed_fit_is_still_fused_and_keeps_its_attention_backend(tmp_path, train_val):
    from amptrain import checkpoint

    opts = dict(precision="fp32", batch_size=4, checkpoint_dir=tmp_path)
    amptrain.fit(tiny_model(), train_val[0], max_steps=2, **opts)
    ckpt = checkpoint.load(checkpoint.latest(tmp_path))
    assert ckpt.trainer["attention"] == "default"
    resumed = amptrain.fit(tiny_model(), train_val[0], max_steps=3, resume=ckpt, **opts)
    assert resumed.fast_path["optimizer_impl"] == "fused"
    assert resumed.fast_path["attention_reason"].startswith("resumed")


def test_cli_flags_reach_the_fit_options():
    from amptrain.cli import build_parser
    from amptrain.cli.common import config_from_args

    argv = ["train", "--compile", "--optimizer-impl", "for-loop", "--attention", "math"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert (cfg.fit.compile, cfg.fit.optimizer_impl, cfg.fit.attention) == (
        True,
        "for-loop",
        "math",
    )
    assert config_from_args(build_parser().parse_args(["train"])).fit.compile == "auto"
    no = config_from_args(build_parser().parse_args(["train", "--no-compile"]))
    assert no.fit.compile is False
    with pytest.raises(ConfigError, match="attention='flash' is invalid"):
        config_from_args(build_parser().parse_args(["train", "--attention", "flash"]))


@pytest.mark.parametrize("math_s, chosen", [(0.5, "math"), (0.9, "math"), (0.95, "default")])
def test_auto_attention_keeps_math_only_when_it_wins_by_the_margin(monkeypatch, math_s, chosen):
    """Controlled timings: math at 0.9 of the default's time or less is taken, above it not."""
    seconds = {"default": 1.0, "math": math_s}
    seen = []

    def timed(model, precision, sample, backend):
        seen.append(backend)
        return seconds[backend]

    monkeypatch.setattr(attention, "time_pass", timed)
    got = attention.plan("auto", tiny_model(), resolve("bf16", "cpu"), pattern_blocks(4).inputs)
    assert got == AttentionPlan(
        chosen, f"measured: math attention takes {math_s:.2f}x the default's time")  # fmt: skip
    assert seen == ["default", "math"] * 4  # a warm-up pass each, then 3 interleaved
