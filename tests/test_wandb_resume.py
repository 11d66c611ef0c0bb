"""A resumed `train --wandb` continues the interrupted run's W&B run, by its id."""

from __future__ import annotations

import json
import signal

import pytest

pytest.importorskip("wandb")

from test_exit_codes import _signal_at_step_end  # noqa: E402
from test_wandb import wandb_env  # noqa: E402, F401

from amptrain import loop  # noqa: E402
from amptrain.cli import main  # noqa: E402

ARGS = ["--max-steps", "3", "--batch-size", "4", "--context", "16", "--layers", "1",
        "--width", "16", "--heads", "2", "--eval-every", "3", "--eval-batches", "1",
        "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_resume_with_wandb_continues_the_same_wandb_run(wandb_env, monkeypatch):  # noqa: F811
    out, real_emit = wandb_env / "runs", loop.emit
    _signal_at_step_end(monkeypatch, 1, signal.SIGTERM)
    assert main(["train", "--wandb", "resume-test", "--out", str(out), *ARGS]) == 143
    monkeypatch.setattr(loop, "emit", real_emit)  # not undo(): W&B's settings must stay
    (run,) = out.glob("train-*")
    run_id = json.loads((run / "wandb.json").read_text())["run_id"]
    assert main(["train", "--resume", "auto", "--wandb", "resume-test", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads((run / "wandb.json").read_text())["run_id"] == run_id
    offline = [p.name for p in (out / "wandb").glob("offline-run-*") if not p.is_symlink()]
    assert len(offline) == 2 and all(name.endswith(f"-{run_id}") for name in offline), offline
