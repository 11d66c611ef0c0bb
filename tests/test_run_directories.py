"""Every command writes `runs/<command>-<timestamp>/` with a `config.json` that reruns it."""

from __future__ import annotations

import json

import pytest

from amptrain.cli import main

MODEL = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size", "4",
         "--no-progress"]  # fmt: skip
# Each command with its own options at small, non-default values, so a rerun that dropped
# them would show.
COMMANDS = {
    "train": ["--max-steps", "2", "--precision", "fp32", "--eval-batches", "2"],
    "bench": ["--eval-batches", "2", "--precisions", "fp32", "--steps", "3", "--warmup-steps",
              "1", "--repeats", "1", "--no-memory", "--quality-tol", "0.05"],
    "doctor": ["--precisions", "bf16", "--batches", "1", "--margin-bits", "3"],
    "compare": ["--steps", "2", "--seeds", "0,1,2", "--no-memory", "--latency-iters", "2",
                "--precision", "fp32"],
    "search": ["--trials", "2", "--budget-steps", "2", "--no-baseline", "--pruner", "none",
               "--precision", "fp32"],
}  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 120)
    return path


def _only_run(out):
    (run,) = out.iterdir()
    assert run.name.startswith(f"{run.name.split('-')[0]}-")
    return run


def _config(run):
    saved = json.loads((run / "config.json").read_text())
    saved.pop("environment")
    saved.pop("out")
    if saved["command"] == "search":
        saved["search"].pop("study")  # the study's name and storage are the run's own
    return saved


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_config_json_reruns_the_command(tmp_path, corpus, command):
    if command == "search":
        pytest.importorskip("optuna")
    first, again = tmp_path / "first", tmp_path / "again"
    assert main([command, "--data", str(corpus), "--out", str(first), *MODEL,
                 *COMMANDS[command]]) == 0  # fmt: skip
    run = _only_run(first)
    assert run.name.startswith(f"{command}-")
    saved = _config(run)
    assert saved["command"] == command
    if command != "train":
        assert saved[command], "the command's own options are recorded"
    assert main([command, "--config", str(run / "config.json"), "--out", str(again)]) == 0
    assert _config(_only_run(again)) == saved


def test_config_section_of_another_command_is_ignored_and_a_wrong_option_refused(
    tmp_path, corpus, capsys
):
    config = tmp_path / "bench.json"
    config.write_text(json.dumps({"command": "bench", "bench": {"stepz": 3}, "context": 16}))
    code = main(["bench", "--config", str(config), "--data", str(corpus), "--out",
                 str(tmp_path / "runs")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "bench has no options ['stepz']" in err
    assert not (tmp_path / "runs").exists()
