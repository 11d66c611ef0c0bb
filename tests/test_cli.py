from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from amptrain.cli import main

SMALL = ["--context", "32", "--batch-size", "4", "--eval-every", "5", "--eval-batches", "2",
         "--no-progress"]  # fmt: skip
TINY = ["--layers", "1", "--width", "32", "--heads", "2", *SMALL]


def run_dir_of(out):
    (run,) = list(out.iterdir())
    return run


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_writes_the_run_directory(tmp_path, corpus, precision, capsys):
    out = tmp_path / "runs"
    code = main(["train", "--data", str(corpus), "--precision", precision, "--max-steps", "6",
                 "--log-every", "1", "--out", str(out), *TINY])  # fmt: skip
    assert code == 0
    run = run_dir_of(out)
    assert run.name.startswith("train-")
    names = {p.name for p in run.iterdir()}
    expected = {"config.json", "metrics.jsonl", "metrics.csv", "summary.json", "model.safetensors"}
    assert expected <= names
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all("amp/loss_scale" in r and "amp/skipped_steps" in r for r in steps)
    if precision == "fp16":
        assert steps[-1]["amp/loss_scale"] == 65536.0
    csv_header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert csv_header[:3] == ["step", "train/loss", "train/lr"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == precision and summary["steps"] == 6
    state = safetensors.torch.load_file(run / "model.safetensors")
    assert "wte.weight" in state
    assert str(run) in capsys.readouterr().out


def test_config_json_reruns_the_same_job(tmp_path, corpus):
    out = tmp_path / "runs"
    args = ["train", "--data", str(corpus), "--precision", "fp32", "--max-steps", "3", *TINY]
    assert main([*args, "--out", str(out / "a")]) == 0
    first = run_dir_of(out / "a")
    config = first / "config.json"
    assert main(["train", "--config", str(config), "--out", str(out / "b"), "--no-progress"]) == 0
    second = run_dir_of(out / "b")
    a = json.loads((first / "summary.json").read_text())
    b = json.loads((second / "summary.json").read_text())
    assert a["final_val_loss"] == b["final_val_loss"]
    saved = json.loads(config.read_text())
    assert saved["fit"]["max_steps"] == 3 and saved["model_kwargs"]["n_layer"] == 1
    assert saved["environment"]["torch"] == torch.__version__


def test_plot_is_written_with_the_plot_extra(tmp_path, corpus):
    pytest.importorskip("matplotlib")
    out = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--max-steps", "2", "--out", str(out), *TINY]) == 0
    png = run_dir_of(out) / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp8"], "Valid values:"),
        (["--precision", "tf32"], "needs an NVIDIA GPU"),
        (["--lr", "-1"], "lr=-1.0 is invalid"),
        (["--batch-size", "0"], "batch_size=0 is invalid"),
        (["--data", "/no/such/corpus"], "data path not found"),
        (["--model", "nope.py:Net"], "model file not found"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--context", "100000"], "fewer than two blocks"),
        (["--model", "x.py:Net", "--layers", "2"], "size the built-in tiny-gpt only"),
        (["--model-kwargs", "[1]"], "model_kwargs must be a JSON object"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, corpus, capsys, args, message):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["train", "--data", str(corpus), "--out", str(tmp_path / "runs"), *SMALL, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_help_is_fast_and_loads_no_extras():
    code = ("import sys; from amptrain.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = {'wandb', 'optuna', 'lightning', 'transformers', 'matplotlib', 'pandas'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "demo" in out.stdout
    assert out.stdout.strip().endswith("[]")


def test_python_dash_m_works(tmp_path, corpus):
    out = subprocess.run(
        [sys.executable, "-m", "amptrain", "train", "--data", str(corpus), "--max-steps", "2",
         "--out", str(tmp_path / "runs"), *TINY],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "amptrain train" in out.stdout


@pytest.mark.slow
def test_demo_learns_the_builtin_corpus(tmp_path):
    from amptrain.cli.demo import run_demo

    run, report = run_demo(out=tmp_path, max_steps=120, progress=False, bench_steps=8,
                           bench_repeats=1)  # fmt: skip
    assert run.result.final_val_loss < 0.6 * run.result.initial_val_loss
    assert report.arm("fp32").status == "ok" and (run.run_dir / "report.md").exists()
    for arm in report.arms:  # the others are timed, or skipped as emulated with the reason
        assert arm.status == "ok" or arm.reason.startswith("skipped:"), (arm.precision, arm.reason)
