from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, pattern_blocks, save_tiny_gpt2, tiny_model
from torch import nn

from amptrain.cli import main
from amptrain.compare import (
    compare,
    gpt_parameters,
    score_tokens,
    size_reference,
    text_windows,
)
from amptrain.compare import report as compare_report
from amptrain.compare.stats import paired_stats, t_critical, t_two_sided_p
from amptrain.errors import ConfigError, ModelError
from amptrain.models import GPTConfig, TinyGPT
from amptrain.precision import resolve

FP32 = resolve("fp32", torch.device("cpu"))
HELD_OUT = "The lazy dog naps; the quick fox jumps — née 'Zoë'.\n"  # non-ASCII: bytes != chars
TRAIN_TEXT = "the quick brown fox jumps over the lazy dog. " * 40
BUDGET = dict(steps=3, batch_size=8, eval_batches=2, precision="fp32", memory=False)


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory):
    """A tiny GPT-2 and its own byte-level BPE tokenizer, saved like a Hub download."""
    pytest.importorskip("transformers")
    return save_tiny_gpt2(tmp_path_factory.mktemp("baseline"), TRAIN_TEXT)


def hand_bits_per_byte(logits: torch.Tensor, ids: list[int], text: str) -> float:
    nats = F.cross_entropy(logits[0, :-1].float(), torch.tensor(ids[1:]), reduction="sum")
    return float(nats) / (math.log(2) * len(text.encode("utf-8")))


def test_bits_per_byte_matches_a_hand_computation(baseline_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    custom = tiny_model(vocab_size=256, block_size=128)
    report = compare(custom, baseline_dir, text=HELD_OUT, precision="fp32", memory=False,
                     latency_iters=1)  # fmt: skip
    ours, theirs = report.scores
    assert report.mode == "pretrained" and (ours.role, theirs.role) == ("custom", "baseline")
    byte_ids = list(HELD_OUT.encode("utf-8"))
    with torch.no_grad():
        expected = hand_bits_per_byte(custom(torch.tensor([byte_ids])), byte_ids, HELD_OUT)
    assert ours.bits_per_byte == pytest.approx(expected, rel=1e-5)
    hf_model = AutoModelForCausalLM.from_pretrained(baseline_dir, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(baseline_dir, local_files_only=True)
    ids = hf_tok(HELD_OUT, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(byte_ids)  # the BPE merges: the two models see different token counts
    with torch.no_grad():
        expected = hand_bits_per_byte(hf_model(torch.tensor([ids])).logits, ids, HELD_OUT)
    assert theirs.bits_per_byte == pytest.approx(expected, rel=1e-5)
    assert (theirs.tokens, theirs.scored_tokens) == (len(ids), len(ids) - 1)
    assert ours.bytes == theirs.bytes == len(HELD_OUT.encode("utf-8")) > len(HELD_OUT)
    assert ours.tokenizer == "bytes" and ours.latency_ms > 0 and theirs.latency_ms > 0
    assert report.model("baseline").parameters == sum(p.numel() for p in hf_model.parameters())
    assert "bits/byte" in report.verdict


class Unigram(nn.Module):
    """Logits that ignore the context, so any windowing must give the plain sum."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(VOCAB))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*ids.shape, VOCAB)


def test_windowed_score_counts_every_token_but_the_first_once():
    model, ids = Unigram(), torch.randint(0, VOCAB, (50,))
    with torch.no_grad():
        expected = F.cross_entropy(model(ids[None])[0, :-1], ids[1:], reduction="sum")
    for window in (2, 7, 8, 50, 64):
        nats, scored = score_tokens(model, ids, window, FP32, batch_size=3)
        assert scored == 49
        assert nats == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(("n", "window"), [(2, 2), (5, 16), (17, 16), (40, 8), (41, 3)])
def test_text_windows_cover_each_target_once_with_context(n, window):
    spans = text_windows(n, window)
    targets = [t for _, end, first in spans for t in range(first, end)]
    assert targets == list(range(1, n))
    assert {end - start for start, end, _ in spans} == {min(window, n)}
    assert all(first - start >= (window - 1) // 2 for start, _, first in spans[1:])


def test_t_distribution_matches_published_values():
    assert t_critical(0.05, 2) == pytest.approx(4.302653, abs=1e-5)
    assert t_critical(0.05, 4) == pytest.approx(2.776445, abs=1e-5)
    assert t_critical(0.01, 10) == pytest.approx(3.169273, abs=1e-5)
    assert t_two_sided_p(2.0, 10) == pytest.approx(0.0733880, abs=1e-6)
    assert t_two_sided_p(0.0, 3) == pytest.approx(1.0)


def test_paired_stats_by_hand():
    custom, reference = [2.0, 2.2, 2.9, 2.5], [2.3, 2.4, 3.3, 2.6]
    s = paired_stats("val_loss", custom, reference, lower_is_better=True)
    diffs = [c - r for c, r in zip(custom, reference)]
    mean, sd = sum(diffs) / 4, statistics.stdev(diffs)
    assert s.diff_mean == pytest.approx(mean) and s.diff_sd == pytest.approx(sd)
    assert s.t == pytest.approx(mean / (sd / 2))
    half = 3.182446 * sd / 2  # t(0.975, df=3)
    assert (s.ci_low, s.ci_high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert s.custom_sd == pytest.approx(statistics.stdev(custom))
    assert s.p_value < 0.05 and s.better == "custom"  # consistently lower loss
    flipped = paired_stats("val_accuracy", custom, reference, lower_is_better=False)
    assert flipped.better == "reference"
    noisy = paired_stats("val_loss", [1.0, 2.0, 3.0], [1.5, 1.9, 3.2], lower_is_better=True)
    assert noisy.p_value > 0.05 and noisy.better == "neither"


def test_reference_sizing_matches_the_parameter_count():
    for vocab, context, layers, width in [(256, 128, 4, 256), (32, 16, 2, 16), (50, 20, 3, 24)]:
        model = TinyGPT(GPTConfig(vocab_size=vocab, block_size=context, n_layer=layers,
                                  n_embd=width, n_head=1))  # fmt: skip
        assert sum(p.numel() for p in model.parameters()) == gpt_parameters(
            vocab, context, layers, width
        )
    target = gpt_parameters(256, 128, 4, 256)
    assert size_reference(target, 256, 128) == size_reference(target, 256, 128, layers=4)
    deeper = size_reference(target, 256, 128, layers=8)
    assert (deeper.n_layer, deeper.n_embd % deeper.n_head) == (8, 0)
    assert abs(deeper.parameters / target - 1) < 0.05


def hooked(model: nn.Module, log: list) -> nn.Module:
    """Record a checksum of every training batch the model sees."""

    def hook(module, args):
        if module.training:
            log.append(int((args[0] * torch.arange(args[0].numel()).view_as(args[0])).sum()))

    model.register_forward_pre_hook(hook)
    return model


def test_same_budget_gives_per_seed_records_and_statistics():
    train, val = pattern_blocks(48, seed=0), pattern_blocks(16, seed=1)
    seen: dict[str, list] = {"custom": [], "reference": []}

    def custom():
        return hooked(tiny_model(), seen["custom"])

    def reference():
        return hooked(tiny_model(n_layer=1, n_embd=24, n_head=2), seen["reference"])

    report = compare(custom, reference, train=train, val=val, seeds=(0, 1, 2), **BUDGET)
    assert [(r.seed, r.role) for r in report.runs] == [
        (s, role) for s in (0, 1, 2) for role in ("custom", "reference")
    ]
    assert seen["custom"] == seen["reference"]  # identical batches, in identical order
    per_seed = [seen["custom"][i : i + 3] for i in (0, 3, 6)]
    assert per_seed[0] != per_seed[1] != per_seed[2]  # the seed changes the batch order
    assert [s.metric for s in report.stats] == [
        "val_loss", "val_perplexity", "val_accuracy", "tokens_per_s"
    ]  # fmt: skip
    loss = report.stat("val_loss")
    custom_losses = [r.val_loss for r in report.runs if r.role == "custom"]
    assert loss.custom_mean == pytest.approx(statistics.fmean(custom_losses))
    assert loss.custom_sd == pytest.approx(statistics.stdev(custom_losses))
    assert loss.ci_low <= loss.diff_mean <= loss.ci_high and 0 <= loss.p_value <= 1
    assert all(r.val_perplexity == pytest.approx(math.exp(r.val_loss)) for r in report.runs)
    assert all(r.steps == 3 and r.tokens_per_s > 0 for r in report.runs)
    assert "paired t-test over 3 seeds" in report.verdict


def unseeded_model() -> TinyGPT:
    return TinyGPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_embd=16, n_head=2, block_size=16))


def test_a_seed_run_equals_fitting_alone_with_that_seed():
    from amptrain import evaluate, fit

    train, val = pattern_blocks(48, seed=0), pattern_blocks(16, seed=1)
    report = compare(unseeded_model, "tiny-gpt", train=train, val=val, seeds=(3, 4, 5), **BUDGET)
    torch.manual_seed(4)  # compare seeds the factory: initial weights differ per seed
    alone = unseeded_model()
    fit(alone, train, precision="fp32", max_steps=3, batch_size=8, seed=4)
    expected = evaluate(alone, val, FP32, batch_size=8, max_batches=2)["val/loss"]
    record = next(r for r in report.runs if r.seed == 4 and r.role == "custom")
    assert record.val_loss == pytest.approx(expected, rel=1e-6)
    ref = report.model("reference")
    assert ref.name.startswith("tiny-gpt 4x")  # twice the depth of the 2-layer custom model
    assert abs(ref.parameters / report.model("custom").parameters - 1) < 0.15


def test_gpt2_reference_through_transformers():
    pytest.importorskip("transformers")
    report = compare(lambda: tiny_model(), "gpt2", train=pattern_blocks(32),
                     val=pattern_blocks(16, seed=1), **{**BUDGET, "steps": 2})  # fmt: skip
    ref = report.model("reference")
    assert ref.name.startswith("gpt2 4x")
    shape = ref.name.split()[1].split("x")
    assert ref.parameters == gpt_parameters(VOCAB, 16, int(shape[0]), int(shape[1]))


def test_fewer_than_three_seeds_are_refused():
    with pytest.raises(ConfigError, match="at least 3 distinct seeds"):
        compare(tiny_model(), train=pattern_blocks(), val=pattern_blocks(), seeds=(0, 1))


def test_missing_baseline_directory_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="baseline directory not found: .*no-such-model"):
        compare(tiny_model(), missing, text=HELD_OUT)


def test_baseline_directory_without_a_model_names_it(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match=f"baseline {tmp_path} holds no model: config.json"):
        compare(tiny_model(), tmp_path, text=HELD_OUT)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TRAIN_TEXT * 5)
    return path


TINY = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size", "4",
        "--eval-batches", "2", "--precision", "fp32", "--steps", "2", "--no-progress",
        "--no-memory"]  # fmt: skip


def test_cli_same_budget_writes_the_report(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(compare_report, "MATPLOTLIB_AVAILABLE", False)  # the PNG: a slow test
    out = tmp_path / "runs"
    assert main(["compare", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    (run,) = out.iterdir()
    names = {p.name for p in run.iterdir()}
    assert names == {"compare.json", "compare.csv", "report.md", "config.json"}
    saved = json.loads((run / "compare.json").read_text())
    assert saved["mode"] == "same-budget" and len(saved["runs"]) == 6
    rows = list(csv.DictReader((run / "compare.csv").open()))
    assert [r["seed"] for r in rows] == ["0", "0", "1", "1", "2", "2"]
    assert "paired two-sided t-test" in (run / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "amptrain compare" in printed and str(run / "report.md") in printed.replace("\n", "")


@pytest.mark.parametrize(
    "mode", ["same-budget", pytest.param("pretrained", marks=pytest.mark.slow)]
)
def test_cli_draws_the_chart_with_the_plot_extra(tmp_path, corpus, baseline_dir, mode):
    pytest.importorskip("matplotlib")
    out = tmp_path / "runs"
    extra = ["--baseline", str(baseline_dir), "--eval-bytes", "300"] if mode == "pretrained" else []
    assert main(["compare", "--data", str(corpus), "--out", str(out), *TINY, *extra]) == 0
    (run,) = out.iterdir()
    assert (run / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_pretrained_mode_writes_bits_per_byte(monkeypatch, tmp_path, corpus, baseline_dir):
    monkeypatch.setattr(compare_report, "MATPLOTLIB_AVAILABLE", False)
    out = tmp_path / "runs"
    args = ["compare", "--baseline", str(baseline_dir), "--data", str(corpus), "--eval-bytes",
            "300", "--latency-iters", "1", "--out", str(out), *TINY]  # fmt: skip
    assert main(args) == 0
    (run,) = out.iterdir()
    saved = json.loads((run / "compare.json").read_text())
    assert saved["mode"] == "pretrained" and saved["settings"]["bytes"] == 300
    assert [s["role"] for s in saved["scores"]] == ["custom", "baseline"]
    assert all(s["bits_per_byte"] > 0 for s in saved["scores"])
    assert saved["settings"]["custom_trained_steps"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "/no/such/model-dir"], "baseline directory not found: /no/such/model-dir"),
        (["--seeds", "0,1"], "at least 3 distinct seeds"),
        (["--seeds", "a,b,c"], "--seeds 'a,b,c' must be comma-separated integers"),
    ],
)
def test_cli_bad_input_exits_2_with_one_clear_line(tmp_path, corpus, capsys, args, message):
    code = main(["compare", "--data", str(corpus), "--out", str(tmp_path / "runs"), *TINY, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_memory_is_measured_per_model_in_a_forked_worker():
    report = compare(lambda: tiny_model(), "tiny-gpt", train=pattern_blocks(32),
                     val=pattern_blocks(16, seed=1), **{**BUDGET, "memory": True})  # fmt: skip
    for info in report.models:
        assert info.mem_mb > 0 and "forked worker" in info.mem_source
        assert info.weights_mb == pytest.approx(info.parameters * 4 / 2**20)
