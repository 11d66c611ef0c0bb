"""`--epochs` instead of `--max-steps`, and `--val-data` instead of a split-off fraction."""

from __future__ import annotations

import json
import math

import pytest

from amptrain import run_setup
from amptrain.cli import main
from amptrain.config import TrainConfig

TINY = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size", "4",
        "--precision", "fp32", "--device", "cpu", "--no-progress", "--no-compile",
        "--eval-batches", "1"]  # fmt: skip


def _run(out):
    (run,) = out.glob("train-*")
    return run, json.loads((run / "config.json").read_text())


@pytest.mark.parametrize("epochs, accum", [(2, 1), (0.5, 2)])
def test_epochs_set_the_steps_from_the_training_blocks(epochs, accum, tmp_path, corpus):
    out = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--epochs", str(epochs), "--grad-accum",
                 str(accum), "--out", str(out), *TINY]) == 0  # fmt: skip
    run, saved = _run(out)
    cfg = TrainConfig(data=str(corpus), context=16)
    _, train, _, _ = run_setup.prepare(cfg)
    expected = math.ceil(epochs * (len(train) // 4) / accum)  # whole batches of 4 per epoch
    assert saved["epochs"] == epochs and saved["fit"]["max_steps"] == expected
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == expected


def test_epochs_and_max_steps_together_are_refused(tmp_path, corpus, capsys):
    out = tmp_path / "runs"
    code = main(["train", "--data", str(corpus), "--epochs", "1", "--max-steps", "3", "--out",
                 str(out), *TINY])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--epochs 1.0 and --max-steps 3 both say how long" in err, err
    assert not out.exists()
    code = main(["train", "--data", str(corpus), "--epochs", "0", "--out", str(out), *TINY])
    assert code == 2 and "epochs=0.0 is invalid" in capsys.readouterr().err


def test_val_data_is_the_validation_set_and_all_of_data_trains(tmp_path, corpus):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a different text entirely, for validation only. " * 40)
    cfg = TrainConfig(data=str(corpus), val_data=str(held_out), context=16)
    _, train, val, _ = run_setup.prepare(cfg)
    whole = run_setup.load_data(TrainConfig(data=str(corpus), context=16),
                                run_setup.tokenizer_for(cfg))  # fmt: skip
    assert len(train) == len(whole) and torch_equal(train.inputs, whole.inputs)
    assert bytes(val.inputs[0].tolist()) == held_out.read_bytes()[:16]
    assert len(val) == len(held_out.read_bytes()) // 16


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_val_data_of_a_dataset_dict_takes_its_validation_or_test_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["train text, many words. " * 8] * 40}),
        "test": datasets.Dataset.from_dict({"text": ["TEST TEXT, OTHER WORDS. " * 8] * 10}),
    }).save_to_disk(str(folder))  # fmt: skip
    cfg = TrainConfig(data=str(folder), val_data=str(folder), context=16)
    _, train, val, _ = run_setup.prepare(cfg)
    assert bytes(train.inputs[0].tolist()).startswith(b"train text")
    assert bytes(val.inputs[0].tolist()).startswith(b"TEST TEXT")
    bare = tmp_path / "bare"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x" * 64] * 4})}
                         ).save_to_disk(str(bare))  # fmt: skip
    with pytest.raises(Exception, match=r"no 'validation' or 'test' split"):
        run_setup.prepare(TrainConfig(data=str(folder), val_data=str(bare), context=16))


def test_a_run_with_val_data_is_evaluated_on_it_and_resumes_only_on_the_same(tmp_path, corpus,
                                                                             capsys):  # fmt: skip
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a different text entirely, for validation only. " * 40)
    out = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--val-data", str(held_out), "--max-steps", "2",
                 "--out", str(out), *TINY]) == 0  # fmt: skip
    run, saved = _run(out)
    assert saved["val_data"] == str(held_out)
    assert main(["eval", "--model", str(run), "--out", str(out), "--no-progress"]) == 0
    figures = json.loads(next(out.glob("eval-*/eval.json")).read_text())
    assert figures["blocks"] == len(held_out.read_bytes()) // 16
    held_out.write_text("changed " * 300)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--out", str(out),
                 "--no-progress"]) == 2  # fmt: skip
    assert "changed since" in capsys.readouterr().err


def test_the_progress_line_counts_to_the_steps_epochs_set():
    import io

    from rich.console import Console

    from amptrain.metrics.console import ProgressSink

    text = io.StringIO()
    sink = ProgressSink(200, "train", Console(file=text, force_terminal=False, width=120))
    sink.log_config({"fit": {"max_steps": 37}})
    sink.log({"train/loss": 1.0, "perf/tokens_per_s": 10.0, "train/lr": 1e-3}, 5)
    assert "step 5/37" in text.getvalue(), text.getvalue()


def test_a_run_started_with_epochs_is_extended_on_resume_with_max_steps(tmp_path, corpus):
    out = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--epochs", "0.2", "--out", str(out),
                 *TINY]) == 0  # fmt: skip
    run, saved = _run(out)
    steps = saved["fit"]["max_steps"]
    assert main(["train", "--resume", str(run), "--max-steps", str(steps + 2), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    _, resumed = _run(out)
    assert resumed["fit"]["max_steps"] == steps + 2 and resumed["epochs"] is None
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps + 2
