"""A trained run is a model: eval, generate, bench, doctor, compare and a new train take it,
and --init-from loads its weights into a model given by --model."""

from __future__ import annotations

import json

import pytest
import torch

from amptrain.cli import main
from amptrain.errors import ConfigError
from amptrain.generate import check_sampling
from amptrain.models import ModelSpec, build_model
from amptrain.models.trained import read_weights

TINY = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 80)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """One short training run, shared: the tests only read it."""
    out = tmp_path_factory.mktemp("trained")
    argv = ["train", "--data", str(corpus), "--max-steps", "6", "--eval-every", "6",
            "--precision", "fp32", "--out", str(out), "--no-progress", *TINY]  # fmt: skip
    assert main(argv) == 0
    (run,) = out.glob("train-*")
    return run


def test_a_run_directory_builds_its_model_with_its_final_weights(trained):
    model = build_model(ModelSpec(str(trained)), 256)
    saved = read_weights(trained / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_eval_scores_the_run_and_writes_eval_json(trained, corpus, tmp_path, capsys):
    assert main(["eval", "--model", str(trained), "--data", str(corpus), "--precision", "fp32",
                 "--out", str(tmp_path / "ev")]) == 0  # fmt: skip
    (path,) = (tmp_path / "ev").glob("eval-*/eval.json")
    figures = json.loads(path.read_text())
    assert figures["tokens"] == figures["blocks"] * 15  # every block, context 16 from the run
    # Byte tokens: bits per byte is the loss in bits.
    assert figures["bits_per_byte"] == pytest.approx(figures["loss"] / 0.6931471805599453)
    assert figures["perplexity"] == pytest.approx(2.718281828459045 ** figures["loss"])
    summary = json.loads((trained / "summary.json").read_text())
    assert figures["loss"] < summary["initial_val_loss"]  # the trained weights, not fresh ones
    assert "eval.json" in capsys.readouterr().out


def test_eval_without_data_scores_the_runs_own_validation_split(trained, corpus, tmp_path):
    assert main(["eval", "--model", str(trained), "--precision", "fp32", "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    (path,) = tmp_path.glob("eval-*/eval.json")
    figures = json.loads(path.read_text())
    assert figures["data"] == f"{corpus} (validation split)"
    summary = json.loads((trained / "summary.json").read_text())
    # The same blocks as the run's last evaluation, so the same loss (up to summation order).
    assert figures["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)


def test_generate_prints_a_seeded_continuation(trained, capsys):
    argv = ["generate", "--model", str(trained), "--prompt", "the quick", "--max-new-tokens",
            "12", "--temperature", "0.8", "--top-k", "5", "--seed", "3", "--precision",
            "fp32"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("the quick")
    # 12 new byte tokens; decoding never shrinks bytes (a replacement character is 3 of them)
    assert first.endswith("\n") and len(first[:-1].encode()) >= len(b"the quick") + 12


def test_sampling_settings_are_checked_first():
    with pytest.raises(ConfigError, match="--temperature -1.0 is invalid"):
        check_sampling(5, -1.0, None)
    with pytest.raises(ConfigError, match="--top-k 0 is invalid"):
        check_sampling(5, 1.0, 0)


def test_init_from_loads_a_runs_weights_into_the_same_architecture(trained, corpus, tmp_path):
    out = tmp_path / "tuned"
    argv = ["train", "--data", str(corpus), "--init-from", str(trained), "--max-steps", "1",
            "--precision", "fp32", "--out", str(out), "--no-progress", *TINY]  # fmt: skip
    assert main(argv) == 0
    (run,) = out.glob("train-*")
    before = json.loads((trained / "summary.json").read_text())
    after = json.loads((run / "summary.json").read_text())
    assert after["initial_val_loss"] < before["initial_val_loss"]  # started trained


def test_init_from_another_architecture_lists_the_differences(trained, corpus, tmp_path, capsys):
    argv = ["train", "--data", str(corpus), "--init-from", str(trained), "--width", "32",
            "--heads", "2", "--layers", "1", "--context", "16", "--out", str(tmp_path)]  # fmt: skip
    code = main(argv)
    assert code == 2 and "shape mismatches" in capsys.readouterr().err


@pytest.mark.slow
def test_train_eval_generate_bench_doctor_compare_on_a_run(trained, corpus, tmp_path):
    model = ["--model", str(trained), "--data", str(corpus), "--out", str(tmp_path / "o")]
    assert main(["train", *model, "--max-steps", "2", "--no-progress", "--batch-size", "4"]) == 0
    assert main(["eval", *model, "--precision", "bf16"]) == 0
    sample = ["generate", "--model", str(trained), "--prompt", "fox", "--max-new-tokens", "4"]
    assert main(sample) == 0
    bench = ["bench", *model, "--precisions", "fp32,bf16", "--steps", "3", "--warmup-steps", "1",
             "--repeats", "1", "--no-memory", "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert main(bench) == 0
    assert main(["doctor", *model, "--precisions", "bf16", "--batches", "1", "--batch-size", "4",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["compare", *model, "--steps", "2", "--seeds", "0,1,2", "--latency-iters", "1",
                 "--no-memory", "--batch-size", "4", "--no-progress"]) == 0  # fmt: skip
