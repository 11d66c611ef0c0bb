"""amptrain.compat: the original tier-3 names, signatures and keys, over the new core."""

from __future__ import annotations

import logging
import math
import textwrap
import types

import pytest
import torch
from conftest import VOCAB, pattern_blocks, save_tiny_gpt2, tiny_model

from amptrain.bench import ArmResult, BenchReport
from amptrain.capability import Capabilities
from amptrain.compat import (
    MetricsTracker,
    builtin_samples,
    compute_effective_precision,
    test_amp_speedup_benchmark,
    test_benchmark_comparison,
    test_fine_tuning,
    test_hyperparameter_search,
)
from amptrain.compat.bench import benchmark_dict
from amptrain.data import builtin_corpus_files
from amptrain.errors import ConfigError, ModelError
from amptrain.precision import resolve

FINE_TUNING_KEYS = {"loss_history", "grad_norm_history", "final_loss", "initial_loss",
                    "training_time_seconds", "samples_per_second", "metrics_summary",
                    "best_epoch", "amp_enabled", "final_loss_scale"}  # fmt: skip
BENCHMARK_KEYS = {"fp32_results", "fp16_results", "speedup", "memory_reduction_percent",
                  "accuracy_difference", "loss_difference", "fp32_time_seconds",
                  "fp16_time_seconds", "fp32_memory_mb", "fp16_memory_mb",
                  "requirements_met"}  # fmt: skip
SEARCH_KEYS = {"best_params", "best_value", "n_trials", "all_trials"}
COMPARISON_KEYS = {"parameter_count", "inference_speed_ms", "perplexity", "baseline_model"}
SUMMARY_COLUMNS = ["epoch", "train/loss", "train/perplexity", "train/accuracy", "val/loss",
                   "val/perplexity", "val/accuracy", "learning_rate", "gradient_norm",
                   "epoch_duration"]  # fmt: skip


@pytest.fixture
def amptrain_warnings():
    logger, seen = logging.getLogger("amptrain"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


@pytest.fixture
def distilgpt2(tmp_path, monkeypatch):
    """A tiny GPT-2 with its own BPE tokenizer in ./distilgpt2, as the original name expects."""
    pytest.importorskip("transformers")
    save_tiny_gpt2(tmp_path / "distilgpt2", "def f(x):\n    return x + 1\n" * 20)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "distilgpt2"


def test_fine_tuning_returns_the_original_keys_and_trains_in_place():
    model, config = tiny_model(), types.SimpleNamespace(vocab_size=VOCAB, max_seq_len=16)
    before = model.lm_head.weight.detach().clone()
    r = test_fine_tuning(model, config, n_epochs=2, learning_rate=3e-3, batch_size=8,
                         use_amp=True)  # fmt: skip
    assert set(r) >= FINE_TUNING_KEYS
    steps = 2 * (40 // 8)  # 50 built-in blocks, a seeded 80/20 split
    assert len(r["loss_history"]) == len(r["grad_norm_history"]) == steps
    assert r["initial_loss"] == r["loss_history"][0] and r["final_loss"] == r["loss_history"][-1]
    amp = resolve("auto", "cpu").name  # what auto decides here, as the toolkit asked it
    assert r["precision"] == amp and r["amp_enabled"] == (amp == "bf16")
    assert r["final_loss_scale"] is None  # no GradScaler: not fp16
    summary = r["metrics_summary"]
    assert list(summary.columns) == SUMMARY_COLUMNS and list(summary["epoch"]) == [0, 1]
    assert r["best_epoch"] == int(summary.loc[summary["val/loss"].idxmin(), "epoch"])
    assert r["samples_per_second"] == pytest.approx(steps * 8 / r["training_time_seconds"])
    assert not model.training  # left in eval mode, as the original did
    assert not torch.equal(before, model.lm_head.weight)  # trained in place


def test_builtin_data_is_real_text_clipped_to_the_vocabulary():
    raw = builtin_samples(50, 32, 256)
    assert raw.shape == (50, 32)
    corpus = b"\n".join(f.read_bytes() for f in builtin_corpus_files())
    assert all(bytes(row.tolist()) in corpus for row in raw)  # each row a slice of the stdlib
    assert torch.equal(builtin_samples(50, 32, 256), raw)  # the same blocks every call
    assert torch.equal(builtin_samples(50, 32, VOCAB), raw % VOCAB)


def test_given_lists_of_tensors_are_stacked_or_padded():
    rows = [torch.arange(i, i + 16) % VOCAB for i in range(20)]
    ragged = rows[:10] + [r[:9] for r in rows[10:]]
    config = types.SimpleNamespace(vocab_size=VOCAB)
    for data in (rows, ragged):
        r = test_fine_tuning(tiny_model(), config, train_data=data, n_epochs=1, batch_size=4)
        assert len(r["loss_history"]) == 16 // 4 and math.isfinite(r["final_loss"])
        assert r["precision"] == "fp32" and r["amp_enabled"] is False


def test_use_amp_says_why_it_falls_back_to_fp32(fake_probe):
    fake_probe(Capabilities("cpu", "old CPU", (), {"fp32": 0.05, "bf16": 0.004, "fp16": 0.001},
                            1, (256,) * 3, 0.1))  # fmt: skip
    r = test_fine_tuning(tiny_model(), None, train_data=pattern_blocks(16), n_epochs=1,
                         batch_size=8, use_amp=True)  # fmt: skip
    assert r["precision"] == "fp32" and "no fast bf16" in r["precision_reason"]


def test_bad_settings_are_refused_before_training(amptrain_warnings):
    config = types.SimpleNamespace(vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="batch_size=64 x gradient_accumulation_steps=1"):
        test_fine_tuning(tiny_model(), config, batch_size=64)
    r = test_fine_tuning(tiny_model(), types.SimpleNamespace(vocab_size=50257), n_epochs=1,
                         batch_size=8, gradient_accumulation_steps=2)  # fmt: skip
    assert len(r["loss_history"]) == 40 // 8 // 2
    assert amptrain_warnings == [f"config.vocab_size=50257 but the model predicts {VOCAB} "
                                 f"tokens; using {VOCAB}"]  # fmt: skip


@pytest.mark.slow
def test_amp_benchmark_maps_bench_onto_the_original_keys():
    r = test_amp_speedup_benchmark(tiny_model(), None, train_data=pattern_blocks(40),
                                   n_epochs=1, batch_size=8)  # fmt: skip
    assert set(r) >= BENCHMARK_KEYS
    assert r["amp_precision"] == "bf16" and r["fp16_results"]["precision"] == "bf16"
    assert r["speedup"] == pytest.approx(
        r["report"].arm("bf16").tokens_per_s / r["report"].arm("fp32").tokens_per_s
    )
    assert r["fp32_results"]["status"] == "ok" and r["fp32_time_seconds"] > 0
    assert len(r["fp16_results"]["loss_history"]) == 32 // 8


def bench_report(bf16_status: str = "ok") -> BenchReport:
    fp32 = ArmResult("fp32", "ok", "requested", step_ms=10.0, tokens_per_s=1000.0,
                     mem_mb=100.0, train_loss=2.0, val_loss=2.5, val_accuracy=0.40,
                     loss_curve=(3.0, 2.0))  # fmt: skip
    bf16 = ArmResult("bf16", "ok", "requested", step_ms=5.0, tokens_per_s=2000.0,
                     speedup_vs_fp32=2.0, mem_mb=65.0, mem_reduction_vs_fp32=0.35,
                     train_loss=2.01, val_loss=2.52, val_accuracy=0.395, val_accuracy_diff=-0.005,
                     loss_curve=(3.0, 2.01))  # fmt: skip
    if bf16_status != "ok":
        bf16 = ArmResult("bf16", bf16_status, "requested", error="out of memory")
    return BenchReport((fp32, bf16), "bf16", "bf16: 2x", {}, {}, {})


def test_amp_benchmark_keys_from_a_bench_report():
    r = benchmark_dict(bench_report(), "bf16", steps=30)
    assert set(r) >= BENCHMARK_KEYS and r["amp_precision"] == "bf16"
    assert r["speedup"] == 2.0 and r["memory_reduction_percent"] == pytest.approx(35.0)
    assert r["loss_difference"] == pytest.approx(0.02) and r["accuracy_difference"] == 0.005
    assert r["fp32_time_seconds"] == pytest.approx(0.3) and r["fp16_time_seconds"] == 0.15
    met = {"speedup_1.5x": True, "memory_reduction_30pct": True,
           "memory_reduction_40pct": False, "accuracy_stable": True}  # fmt: skip
    assert r["requirements_met"] == met
    assert r["fp16_results"]["loss_history"] == [3.0, 2.01] and r["fp16_results"]["amp_enabled"]
    failed = benchmark_dict(bench_report("oom"), "bf16", steps=30)
    assert failed["speedup"] is None and failed["fp16_results"]["error"] == "out of memory"
    assert set(failed["requirements_met"].values()) == {None}


def test_metrics_tracker_keeps_the_original_record():
    tracker = MetricsTracker(use_wandb=False)
    assert tracker.compute_perplexity(0.0) == 1.0 and tracker.compute_perplexity(800) == math.inf
    assert tracker.compute_perplexity(150) == pytest.approx(math.exp(150))  # no clip at 100
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert tracker.compute_accuracy(logits, torch.tensor([[1, 1]])) == 0.5
    assert tracker.compute_accuracy(logits.view(2, 2), torch.tensor([1, -100])) == 1.0
    assert math.isnan(tracker.compute_accuracy(logits, torch.tensor([[-100, -100]])))
    with pytest.raises(KeyError, match="no logged epoch"):
        tracker.get_best_epoch()
    for epoch, (val, acc) in enumerate([(2.0, 0.1), (1.5, 0.3), (1.5, 0.2), (math.nan, 0.0)]):
        row = tracker.log_epoch(epoch, {"loss": 2.5, "accuracy": 0.1},
                                {"loss": val, "accuracy": acc}, 1e-3, 0.5, 0.1)  # fmt: skip
    assert list(row) == SUMMARY_COLUMNS and row["train/perplexity"] == pytest.approx(math.exp(2.5))
    assert tracker.get_best_epoch() == 1  # ties: the first; nan: skipped
    assert tracker.get_best_epoch("val/accuracy", "max") == 1
    assert len(tracker.get_summary()) == 4 and tracker.metrics_history[0]["epoch"] == 0


def test_metrics_tracker_without_a_wandb_run_warns_once(amptrain_warnings):
    pytest.importorskip("wandb")
    tracker = MetricsTracker()  # use_wandb=True is the original default
    for epoch in range(3):
        tracker.log_epoch(epoch, {"loss": 1.0}, {"loss": 1.0}, 1e-3, 0.5, 0.1)
    assert len(amptrain_warnings) == 1 and "wandb.init()" in amptrain_warnings[0]
    assert len(tracker.metrics_history) == 3


def expected_precision(requested, use_amp, cuda, gpu):
    """The original truth table, except that a bf16 request stays bf16 when AMP is on."""
    if use_amp is None:
        return requested
    if not use_amp:
        return "32"
    if requested in ("bf16", "bf16-mixed"):
        return requested
    return "16" if cuda and gpu else "32"


@pytest.mark.parametrize("requested", ["32", "16", "bf16", "16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("use_amp", [None, True, False, 0, 1])
def test_compute_effective_precision_truth_table(requested, use_amp, amptrain_warnings):
    for cuda in (True, False):
        for gpu in (True, False):
            args = (requested, use_amp, cuda, gpu)
            amptrain_warnings.clear()
            assert compute_effective_precision(*args) == expected_precision(*args), args
            # The original's value, and a word where Lightning will not do what it says.
            cpu_fp16 = use_amp is None and requested in ("16", "16-mixed") and not (cuda and gpu)
            assert bool(amptrain_warnings) == cpu_fp16, args
            if cpu_fp16:
                assert "will train bf16-mixed instead" in amptrain_warnings[0]


def test_compute_effective_precision_returns_the_misspelling_with_a_warning(amptrain_warnings):
    assert compute_effective_precision("16_true", None, True, True) == "16_true"
    assert "'16_true' is not a Lightning precision" in amptrain_warnings[0]
    assert compute_effective_precision("16_true", True, True, True) == "16"
    assert compute_effective_precision("16_true", False, False, False) == "32"


def test_metrics_tracker_reaches_wandb_log_however_wandb_is_imported(monkeypatch):
    wandb = pytest.importorskip("wandb")
    calls = []
    monkeypatch.setattr(wandb, "log", lambda row, *a, **k: calls.append(row))
    tracker = MetricsTracker(use_wandb=True)
    tracker.log_epoch(0, {"loss": 1.0}, {"loss": 0.5}, 1e-3, 0.5, 0.1)
    assert len(calls) == 1 and calls[0]["val/loss"] == 0.5 and calls[0]["epoch"] == 0
    assert tracker._get_gpu_utilization() >= 0.0  # 0.0 without nvidia-smi, as the original


def test_amp_wandb_callback_serves_a_duck_typed_trainer(monkeypatch):
    pytest.importorskip("lightning")
    wandb = pytest.importorskip("wandb")
    import types

    from amptrain.compat import AmpWandbCallback

    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    plugin = types.SimpleNamespace(scaler=scaler)
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(precision_plugin=plugin),
                                    current_epoch=3)  # fmt: skip
    calls = []
    monkeypatch.setattr(wandb, "run", object())
    monkeypatch.setattr(wandb, "log", lambda row, step=None: calls.append((row, step)))
    callback = AmpWandbCallback(enabled=True, precision="16-mixed")
    assert callback._get_loss_scale(trainer) == 512.0
    assert callback._get_loss_scale(types.SimpleNamespace()) is None
    callback.on_train_epoch_end(trainer, None)
    assert calls == [({"amp/enabled": 1, "amp/precision": "16-mixed", "amp/loss_scale": 512.0}, 3)]


def test_a_baseline_directory_without_a_tokenizer_is_refused_in_one_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    from amptrain.compare.text import load_baseline

    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "bare")
    with pytest.raises(ModelError, match=r"bare has no tokenizer \(none of tokenizer.json"):
        load_baseline(tmp_path / "bare")


def test_hyperparameter_search_maps_the_original_space():
    pytest.importorskip("optuna")
    space = {"lr": (1e-3, 1e-2), "batch_size": [4, 8], "warmup": (0, 2), "wd": (1e-6, 1e-2)}
    r = test_hyperparameter_search(lambda: tiny_model(), None, train_data=pattern_blocks(30),
                                   n_trials=2, search_space=space)  # fmt: skip
    assert set(r) >= SEARCH_KEYS and r["n_trials"] == 2 and len(r["all_trials"]) == 2
    best = r["best_params"]
    assert set(best) == {"learning_rate", "batch_size", "warmup_steps", "weight_decay"}
    assert 1e-3 <= best["learning_rate"] <= 1e-2 and best["batch_size"] in (4, 8)
    assert best["warmup_steps"] in (0, 1, 2)
    assert r["best_value"] == min(t["value"] for t in r["all_trials"])
    assert {"number", "value", "params"} == set(r["all_trials"][0])
    with pytest.raises(ConfigError, match="'epochs'"):
        test_hyperparameter_search(lambda: tiny_model(), None, search_space={"epochs": [1]})


def test_benchmark_comparison_against_a_local_pretrained_baseline(distilgpt2):
    model = tiny_model(vocab_size=256)
    r = test_benchmark_comparison(model, types.SimpleNamespace(vocab_size=256, max_seq_len=16),
                                  n_samples=4)  # fmt: skip
    assert set(r) >= COMPARISON_KEYS and r["baseline_model"] == "distilgpt2"
    params = r["parameter_count"]
    assert params["custom"] == sum(p.numel() for p in model.parameters())
    assert params["ratio"] == pytest.approx(params["custom"] / params["baseline"])
    ppl, bpb = r["perplexity"], r["bits_per_byte"]
    assert ppl["custom"] == pytest.approx(2 ** bpb["custom"])  # per byte: tokenizer-neutral
    assert r["inference_speed_ms"]["speedup"] == pytest.approx(
        r["inference_speed_ms"]["baseline"] / r["inference_speed_ms"]["custom"]
    )


def test_benchmark_comparison_never_downloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download distilgpt2"):
        test_benchmark_comparison(tiny_model(vocab_size=256), None)


ORIGINAL_CELL = textwrap.dedent("""
    import torch
    import torch.nn as nn
    from types import SimpleNamespace
    from amptrain.compat import (MetricsTracker, compute_effective_precision,
                                 test_amp_speedup_benchmark, test_benchmark_comparison,
                                 test_fine_tuning, test_hyperparameter_search)

    class CustomTransformer(nn.Module):
        def __init__(self, vocab_size=256, d_model=32, n_heads=2, n_layers=1, max_seq_len=32):
            super().__init__()
            self.tok = nn.Embedding(vocab_size, d_model)
            self.pos = nn.Embedding(max_seq_len, d_model)
            layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0,
                                               batch_first=True)
            self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
            self.head = nn.Linear(d_model, vocab_size)

        def forward(self, input_ids):
            t = input_ids.size(1)
            mask = nn.Transformer.generate_square_subsequent_mask(t, device=input_ids.device)
            h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
            return self.head(self.blocks(h, mask=mask, is_causal=True))

    config = SimpleNamespace(vocab_size=256, max_seq_len=32, max_batch_size=8)
    model = CustomTransformer()

    results = test_fine_tuning(model, config, n_epochs=3, batch_size=2, use_wandb=False)
    print(f"final loss {results['final_loss']:.4f}, best epoch {results['best_epoch']}")
    hpo = test_hyperparameter_search(lambda: CustomTransformer(), config, n_trials=2)
    print(f"best validation loss {hpo['best_value']:.4f} with {hpo['best_params']}")
    comparison = test_benchmark_comparison(model, config, baseline_model_name="distilgpt2",
                                           n_samples=10)
    amp = test_amp_speedup_benchmark(model, config, n_epochs=1, use_wandb=False)
    print(f"AMP speedup {amp['speedup']:.2f}x")
    tracker = MetricsTracker(use_wandb=False)
    precision = compute_effective_precision("16", True, torch.cuda.is_available(), True)
""")


@pytest.mark.slow
def test_an_original_notebook_cell_runs_unchanged(distilgpt2, capsys):
    pytest.importorskip("optuna")
    namespace: dict = {}
    exec(compile(ORIGINAL_CELL, "<original cell>", "exec"), namespace)
    assert set(namespace["results"]) >= FINE_TUNING_KEYS
    assert set(namespace["hpo"]) >= SEARCH_KEYS
    assert set(namespace["comparison"]) >= COMPARISON_KEYS
    assert set(namespace["amp"]) >= BENCHMARK_KEYS
    assert namespace["precision"] == ("16" if torch.cuda.is_available() else "32")
    assert "AMP speedup" in capsys.readouterr().out


@pytest.mark.gpu
def test_use_amp_on_cuda_is_fp16_with_loss_scaling():
    model = tiny_model().cuda()
    r = test_fine_tuning(model, None, train_data=pattern_blocks(40), n_epochs=1, batch_size=8,
                         use_amp=True)  # fmt: skip
    assert r["precision"] == "fp16" and r["amp_enabled"] and r["final_loss_scale"] > 0
