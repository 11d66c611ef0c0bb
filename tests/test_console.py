"""The console: a progress line that keeps what matters at 80 columns, loss lines when not a
terminal, the fast path in one line said once, and third-party chatter kept quiet."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings

import pytest
from conftest import pattern_blocks, tiny_model
from rich.console import Console

from amptrain import fit
from amptrain.cli.common import QUIET_ENV, quiet_libraries
from amptrain.metrics.console import ProgressSink, fit_figures

STEP = {"train/loss": 2.4447, "train/lr": 3e-4, "train/grad_norm": 0.9, "amp/loss_scale": 1.0,
        "amp/skipped_steps": 0, "perf/tokens_per_s": 4602.3}  # fmt: skip
ETA = r"(\d+|-):(\d\d|--):(\d\d|--)"


def _last_frame(width: int, metrics: dict, total: int = 240) -> str:
    """The progress line as a terminal `width` columns wide shows it last."""
    out = io.StringIO()
    console = Console(width=width, file=out, force_terminal=True, color_system=None)
    sink = ProgressSink(total, "train", console=console)
    for step in (10, 60, 120):
        sink.log(metrics, step)
    sink.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    return [line for line in text.splitlines() if line.strip()][-1]


def test_80_columns_keep_the_step_count_tokens_per_s_and_the_eta():
    line = _last_frame(80, STEP)
    assert len(line) <= 80 and "120/240" in line and "4,602 tok/s" in line, line
    assert re.search(ETA + r"\s*$", line) and "loss 2.4447" in line, line
    assert "scale" not in line and "skipped" not in line  # no scaler at work: nothing to say


def test_skipped_steps_are_kept_before_the_learning_rate_when_room_is_short():
    line = _last_frame(80, {**STEP, "amp/loss_scale": 32768.0, "amp/skipped_steps": 3})
    assert len(line) <= 80 and "120/240" in line and "tok/s" in line and "skipped 3" in line
    assert re.search(ETA + r"\s*$", line), line
    wide = _last_frame(160, {**STEP, "amp/loss_scale": 32768.0, "amp/skipped_steps": 3})
    assert "lr 3.00e-04" in wide and "scale 32768" in wide and "skipped 3" in wide


def test_figures_drop_the_least_useful_first():
    fp16 = {**STEP, "amp/loss_scale": 1024.0, "amp/skipped_steps": 2}
    assert fit_figures(fp16, 1000) == (
        "loss 2.4447  4,602 tok/s  lr 3.00e-04  scale 1024  skipped 2"
    )
    assert fit_figures(fp16, 40) == "loss 2.4447  4,602 tok/s  skipped 2"
    assert fit_figures(fp16, 5) == "4,602 tok/s"  # tokens/s stays whatever the width


def test_not_a_terminal_prints_a_loss_line_per_logged_step():
    out = io.StringIO()
    sink = ProgressSink(6, "train", console=Console(width=80, file=out))
    assert not sink.live
    for step in (2, 4, 6):
        sink.log({**STEP, "train/loss": 3.0 - step / 10}, step)
    sink.log({"val/loss": 2.5, "val/accuracy": 0.25}, 6)
    sink.close()
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines[:3]] == [
        "train step 2/6", "train step 4/6", "train step 6/6"
    ]  # fmt: skip
    assert "loss 2.6000" in lines[1] and re.search("ETA " + ETA, lines[1])
    assert lines[3] == "step 6: val/loss 2.5000  val/accuracy 0.250"


def test_the_fast_path_is_one_line_said_again_only_when_it_changes(caplog):
    def fit_with(impl: str) -> None:
        fit(tiny_model(), pattern_blocks(8), precision="fp32", max_steps=1, batch_size=4,
            optimizer_impl=impl, attention="default", loss="unfused", compile=False)  # fmt: skip

    line = "fast path: AdamW {}, attention default, unfused loss, not compiled".format
    with caplog.at_level(logging.INFO, logger="amptrain"):
        fit_with("for-loop")  # said, unless the process said it last
        for _ in range(3):  # a search: one fit per trial
            fit_with("foreach")
        fit_with("for-loop")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fast path")]
    assert said[-2:] == [line("foreach"), line("for-loop")]
    assert said[:-2] in ([], [line("for-loop")])


def test_library_chatter_is_quiet_unless_verbose_and_put_back_after(monkeypatch):
    for name in QUIET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # the user's own choice wins
    mlflow = logging.getLogger("mlflow")
    before = mlflow.level
    with quiet_libraries(verbose=False):
        assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
        assert not mlflow.isEnabledFor(logging.WARNING) and mlflow.isEnabledFor(logging.ERROR)
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit("chatter", UserWarning, "store.py", 1, module="mlflow.store")
            warnings.warn_explicit("ours", UserWarning, "loop.py", 1, module="amptrain.loop")
    assert [str(w.message) for w in seen] == ["ours"]
    assert "MLFLOW_LOGGING_LEVEL" not in os.environ and mlflow.level == before
    with quiet_libraries(verbose=True):
        assert "MLFLOW_LOGGING_LEVEL" not in os.environ


def test_the_model_directory_tokenizer_is_named_once(tmp_path, caplog):
    tokenizers = pytest.importorskip("tokenizers")
    from amptrain import run_setup
    from amptrain.config import TrainConfig

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=40, show_progress=False)
    bpe.train_from_iterator(["the quick brown fox " * 20], trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    cfg = TrainConfig(model=str(tmp_path), context=16)
    logging.getLogger("amptrain").propagate = True
    with caplog.at_level(logging.INFO, logger="amptrain"):
        for _ in range(3):  # a run asks more than once: data, model size, the model itself
            run_setup.tokenizer_for(cfg)
    said = [r for r in caplog.records if "tokenizer" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path / "tokenizer.json") in said[0].getMessage()
