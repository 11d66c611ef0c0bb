"""The compiled step: one graph for forward and loss, the auto decision, no host reads."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CONTEXT, HostReads, importable, pattern_blocks, tiny_model

import amptrain
from amptrain import autocompile, checkpoint
from amptrain.autocompile import decide
from amptrain.compiling import compile_loss, eager_loss, fused_loss, unchunked_loss
from amptrain.models import ModelSpec, build_model

STYLES = Path(__file__).parent / "model_styles"
# Compiled and eager steps add the same terms in a different order (fused kernels): the
# stated tolerance for fp32 loss and gradients.
COMPILED_RTOL, COMPILED_ATOL = 1e-4, 1e-5


@pytest.fixture
def styles(tmp_path) -> Iterator[dict[str, torch.nn.Module]]:
    """The built-in model, every model style of tests/model_styles and Hugging Face's Llama and
    Qwen2 (when transformers is installed), tiny."""
    root = tmp_path / "styles"
    shutil.copytree(STYLES, root)
    with importable(root):  # minGPT imports `mingpt.utils`, llama `layers`
        yield _style_models(root)


def _style_models(root: Path) -> dict[str, torch.nn.Module]:
    small = {"n_layer": 2, "n_head": 2, "n_embd": 16}
    specs = {
        "nanogpt": ModelSpec(f"{root}/nanogpt_model.py:GPT", small),
        "mingpt": ModelSpec(f"{root}/mingpt/model.py:GPT", {"model_type": None, **small}),
        "llama-style": ModelSpec(f"{root}/llama_style.py:Transformer", {"dim": 16, "n_layers": 2}),
    }
    models = {"tiny-gpt": tiny_model(), **{n: build_model(s, 32, 8) for n, s in specs.items()}}
    try:
        import transformers
    except ImportError:  # the hf extra: without it, the Hugging Face families are not tested
        return models
    for family in ("Llama", "Qwen2"):
        config = getattr(transformers, f"{family}Config")(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        )  # fmt: skip
        models[f"hf-{family}"] = transformers.AutoModelForCausalLM.from_config(config)
    return models


@pytest.mark.slow
def test_zero_graph_breaks_for_the_built_in_model_and_every_style(styles):
    ids = torch.randint(0, 32, (2, 8))
    for name, model in styles.items():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fused_loss(model, -100, chunked=False))(model, ids, ids)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        assert explained.graph_count == 1, name


class StopAt(amptrain.Callback):
    """Asks training to stop after step `step`, as a signal would (the step is checkpointed)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state, metrics) -> None:
        state.should_stop = state.should_stop or state.step == self.step


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory):
    """An eager and a compiled fp32 run of the tiny model, and a compiled run cut at step 2 and
    resumed: one compiled graph (inductor's cache serves the repeats), shared by the tests."""
    tmp = tmp_path_factory.mktemp("compiled")
    train, val = pattern_blocks(48, seed=0), pattern_blocks(16, seed=1)
    common = dict(precision="fp32", max_steps=4, batch_size=4, eval_every=2, lr=1e-2, log_every=1)
    runs = {}
    for name, compile in (("eager", False), ("compiled", True)):
        model = tiny_model()
        runs[name] = (amptrain.fit(model, train, val, compile=compile, **common), model)
    amptrain.fit(tiny_model(), train, val, compile=True, checkpoint_dir=tmp, callbacks=[StopAt(2)],
                 **common)  # fmt: skip
    ckpt = checkpoint.load(checkpoint.latest(tmp))
    resumed = tiny_model()
    result = amptrain.fit(resumed, train, val, compile=True, resume=ckpt, **common)
    runs["resumed"] = (result, resumed)
    return runs


@pytest.mark.slow
def test_compiled_and_eager_runs_agree_without_recompiles(compiled_runs):
    (eager, plain), (compiled, model) = compiled_runs["eager"], compiled_runs["compiled"]
    record = compiled.fast_path
    assert record["compiled"] and record["compile_reason"] == "forced by --compile / compile=True"
    assert record["compile_s"] > 0 and record["compiled_loss"].startswith("F.cross_entropy")
    assert record["recompiles"] == 0  # evaluation runs the eager model: no recompile
    assert list(model.state_dict()) == list(plain.state_dict())  # the model is not wrapped
    for key in ("final_train_loss", "final_val_loss"):
        assert getattr(compiled, key) == pytest.approx(getattr(eager, key), rel=COMPILED_RTOL)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=COMPILED_RTOL, atol=COMPILED_ATOL)


@pytest.mark.slow
def test_a_compiled_run_resumes_to_the_same_weights(compiled_runs):
    (straight, model), (resumed, again) = compiled_runs["compiled"], compiled_runs["resumed"]
    assert resumed.fast_path["compiled"] and resumed.steps == 4
    assert resumed.final_val_loss == pytest.approx(straight.final_val_loss, rel=COMPILED_RTOL)
    for p, q in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(p, q, rtol=COMPILED_RTOL, atol=COMPILED_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("regional", [False, True], ids=["one-graph", "regional"])
def test_compiled_and_eager_steps_agree_on_loss_and_gradients(regional):
    model = tiny_model()
    ids = pattern_blocks(4).inputs  # the shape of compiled_runs: inductor's cache serves it
    compiled = compile_loss(model, ids, 32, -100, regional=regional)
    losses, grads = [], []
    try:
        for fn in (eager_loss(-100), compiled.fn):
            loss = fn(model, ids, ids.clone())
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
    finally:
        compiled.undo()
    if regional:
        assert compiled.record["compiled_blocks"] == "2 x Block (blocks), compiled once"
    torch.testing.assert_close(losses[1], losses[0], rtol=COMPILED_RTOL, atol=COMPILED_ATOL)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=COMPILED_RTOL, atol=COMPILED_ATOL)


@pytest.mark.slow
def test_the_grad_scaler_skip_still_skips_under_compile(train_val):
    from test_loop import InjectInf

    model = tiny_model()
    inject = InjectInf(model, bad_steps={2})
    result = amptrain.fit(model, train_val[0], precision="fp16", callbacks=[inject],
                          max_steps=3, batch_size=4, compile=True)  # fmt: skip
    assert result.fast_path["compiled"] and result.skipped_steps == 1
    for before, after in zip(inject.snapshots[1], inject.snapshots[2]):
        assert torch.equal(before, after)  # the skipped step left every weight alone
    assert result.loss_scale == 65536.0 / 2


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
    saved = 40 * 0.05 * autocompile.SAVING_GUESS
    assert not decision.compile
    assert decision.reason.startswith(
        f"eager: 40 steps x 0.05 s x {autocompile.SAVING_GUESS:.0%} saved = {saved:.3g} s < 60 s"
    )
    assert decision.figures["compile_s_estimate"] == autocompile.COMPILE_GUESS_S
    bf16 = decide(40, eager_step_s=0.05, recorded=None, autocast=True)
    assert not bf16.compile and f"x {autocompile.AUTOCAST_SAVING_GUESS:.0%} saved" in bf16.reason


@pytest.mark.parametrize("autocast", [False, True])
def test_without_a_record_a_run_compiles_once_its_assumed_saving_repays_the_compile(autocast):
    """The rule, not a tuned case: steps x step time x the assumed saving against the assumed
    compile time, on both sides of the boundary."""
    guess = autocompile.AUTOCAST_SAVING_GUESS if autocast else autocompile.SAVING_GUESS
    step_s = 0.25
    repaid_at = autocompile.COMPILE_GUESS_S / (step_s * guess)  # steps where the two are equal
    assert decide(int(repaid_at * 1.1), step_s, None, autocast=autocast).compile
    assert not decide(int(repaid_at * 0.9), step_s, None, autocast=autocast).compile


def test_auto_compiles_a_long_run_and_trusts_a_recorded_measurement():
    assert decide(20_000, eager_step_s=0.5, recorded=None).compile  # 100 s saved >= 60 s
    fast = {"compile_s": 8.0, "eager_step_s": 0.1, "compiled_step_s": 0.08}
    decision = decide(500, eager_step_s=0.1, recorded=fast)
    assert decision.compile and "median of 1 run(s) recorded" in decision.reason
    assert decision.figures["saving_estimate"] == pytest.approx(0.2)
    slow = {"compile_s": 8.0, "saving": -0.2, "runs": autocompile.VETO_RUNS}
    assert not decide(10**6, eager_step_s=0.1, recorded=slow).compile


def test_a_compiled_step_measured_no_faster_goes_back_to_eager():
    decision = decide(20_000, eager_step_s=0.5, recorded=None)  # long: compiled on the guess
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


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_no_host_reads_on_non_logging_steps(monkeypatch, train_val, precision):
    from amptrain import stepping

    reads = HostReads(monkeypatch)
    per_step = []
    original = stepping.train_step

    def counted(*args, **kwargs):
        reads.on, reads.count = True, 0
        return original(*args, **kwargs)

    add = stepping.DeviceCounters.add

    def add_then_stop(self, out, step):
        add(self, out, step)
        per_step.append(reads.count)
        reads.on = False

    monkeypatch.setattr(stepping, "train_step", counted)
    monkeypatch.setattr(stepping.DeviceCounters, "add", add_then_stop)
    result = amptrain.fit(tiny_model(), train_val[0], precision=precision, max_steps=6,
                          batch_size=4, log_every=3, compile=False)  # fmt: skip
    assert len(per_step) == 6 and per_step == [0] * 6  # the step and its counters: no read
    logged = [r["step"] for r in result.history if "train/loss" in r]
    assert logged == [3, 6] and result.tokens == 6 * 4 * (CONTEXT - 1)
