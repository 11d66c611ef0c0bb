"""`compile="auto"` decides on medians: of timed passes, and of the runs a record keeps."""

from __future__ import annotations

import contextlib
import json
import statistics

import pytest
import torch
from conftest import pattern_blocks, tiny_model

import amptrain
from amptrain import autocompile
from amptrain.autocompile import confirm, decide, load_record, measure_eager, save_record
from amptrain.compiling import eager_loss, time_steps
from amptrain.config import FitOptions
from amptrain.precision import Precision

KEY = "TinyGPT|1|4x8x1|fp32|cpu|torch"


@pytest.fixture
def records(tmp_path, monkeypatch):
    """Records in a cache folder of the test's own."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    return autocompile.records_path()


def measured(eager: float, compiled: float, compile_s: float = 8.0) -> dict[str, float]:
    return {"compile_s": compile_s, "eager_step_s": eager, "compiled_step_s": compiled}


def test_one_noisy_run_does_not_flip_a_record_s_decision(records):
    for _ in range(3):
        save_record(KEY, measured(0.10, 0.08))  # 20 % saved, three times
    save_record(KEY, measured(0.10, 0.15))  # one noisy run: compiled measured 50 % slower
    record = load_record(KEY)
    assert record["runs"] == 4 and record["saving"] == pytest.approx(0.2)
    decision = decide(1000, eager_step_s=0.1, recorded=record)
    assert decision.compile and "median of 4 run(s) recorded" in decision.reason
    assert decision.figures["saving_estimate"] == pytest.approx(0.2)


def test_a_record_keeps_the_last_runs_and_their_median_decides(records):
    for compiled in (0.08, 0.08, 0.08, 0.12, 0.12, 0.12):
        save_record(KEY, measured(0.10, compiled, compile_s=compiled * 100))
    runs = json.loads(records.read_text())[KEY]["runs"]
    assert len(runs) == autocompile.RECORD_RUNS == 5
    assert [r["compiled_step_s"] for r in runs] == [0.08, 0.08, 0.12, 0.12, 0.12]
    record = load_record(KEY)
    assert record["saving"] == pytest.approx(-0.2) and record["compile_s"] == pytest.approx(12)
    decision = decide(10**6, eager_step_s=0.1, recorded=record)
    assert not decision.compile and "measured no faster" in decision.reason


def test_one_bad_first_run_does_not_lock_a_model_into_eager(records):
    save_record(KEY, measured(0.10, 0.15))
    again = decide(10**4, eager_step_s=0.1, recorded=load_record(KEY))
    assert again.compile and "fewer than 3: saving assumed, measured again" in again.reason
    save_record(KEY, measured(0.10, 0.15))
    save_record(KEY, measured(0.10, 0.15))
    assert not decide(10**4, eager_step_s=0.1, recorded=load_record(KEY)).compile


def test_a_record_of_the_earlier_single_measurement_shape_still_reads(records):
    records.write_text(json.dumps({KEY: measured(0.10, 0.05), "other": "junk"}))
    assert load_record(KEY) == {"compile_s": 8.0, "saving": 0.5, "runs": 1}
    assert load_record("other") is None
    save_record(KEY, measured(0.10, 0.09))
    assert load_record(KEY)["runs"] == 2 and load_record(KEY)["saving"] == pytest.approx(0.3)


def test_confirm_keeps_the_compiled_step_only_when_its_median_is_faster():
    decision = decide(20_000, eager_step_s=statistics.median([0.5, 0.9, 0.5]), recorded=None)
    passes = [0.4, 1.2, 0.41]  # one slow compiled pass: its median is still faster
    kept = confirm(decision, compile_s=30.0, compiled_step_s=statistics.median(passes))
    assert kept.compile and kept.figures["compiled_step_s"] == 0.41
    dropped = confirm(decision, compile_s=30.0, compiled_step_s=0.5)
    assert not dropped.compile and "0.5 s vs 0.5 s eager" in dropped.reason


def test_eager_passes_are_timed_three_times_when_it_may_compile_and_the_median_reported():
    model, sample = tiny_model(), pattern_blocks(4).inputs
    prec = Precision("fp32", torch.device("cpu"), "test")
    eager = eager_loss(-100)
    pays = {"compile_s": 1e-6, "saving": 0.5, "runs": 3}  # anything compiles: time it well

    def time_with(recorded):
        def time_passes(n: int) -> list[float]:
            return time_steps(eager, model, prec, sample, contextlib.nullcontext, n)

        return measure_eager(time_passes, 10, 1, False, recorded)

    decision = time_with(pays)
    passes = decision.figures["eager_passes_s"]
    assert len(passes) == autocompile.TIMED_PASSES == 3 and decision.compile
    assert decision.figures["eager_step_s"] == pytest.approx(statistics.median(passes), abs=1e-6)
    never = {"compile_s": 1e9, "saving": 0.5, "runs": 3}  # clearly too short: one pass will do
    assert len(time_with(never).figures["eager_passes_s"]) == 1
    assert all(p.grad is None for p in model.parameters())  # timing leaves no gradients


def test_a_short_auto_run_reports_its_timed_pass(train_val):
    result = amptrain.fit(tiny_model(), train_val[0], precision="fp32", max_steps=3,
                          batch_size=4)  # fmt: skip
    record = result.fast_path
    assert not record["compiled"] and len(record["eager_passes_s"]) == 1
    assert record["eager_step_s"] == pytest.approx(record["eager_passes_s"][0], abs=1e-6)


@pytest.mark.slow
def test_an_auto_compile_is_confirmed_on_the_median_of_timed_compiled_passes(records):
    model, sample = tiny_model(), pattern_blocks(4).inputs
    prec = Precision("fp32", torch.device("cpu"), "test")
    plan = autocompile.plan_compile(model, prec, sample, contextlib.nullcontext,
                                    FitOptions(compile="auto"), 10**7)  # fmt: skip
    plan.undo()
    record = plan.record
    assert len(record["eager_passes_s"]) == len(record["compiled_passes_s"]) == 3
    median = statistics.median(record["compiled_passes_s"])
    assert record["compiled_step_s"] == pytest.approx(median, abs=1e-6)
    # the eager figure confirm compares with is the median of the passes timed after compiling
    eager = statistics.median(record["eager_passes_s"])
    assert record["eager_step_s"] == pytest.approx(eager, abs=1e-6)
    assert record["compiled"] == (record["compiled_step_s"] < record["eager_step_s"])
    saved = json.loads(records.read_text())
    (entry,) = saved.values()  # the measurement went to the record, for the next run
    assert entry["runs"][-1]["compiled_step_s"] == record["compiled_step_s"]


def test_after_compiling_eager_and_compiled_passes_are_timed_alternately():
    calls = []

    def timed(kind: str, seconds: float):
        return lambda: calls.append(kind) or seconds

    eager, compiled = autocompile.alternate(timed("eager", 0.3), timed("compiled", 0.2))
    assert calls == ["eager", "compiled"] * autocompile.TIMED_PASSES
    assert eager == [0.3] * 3 and compiled == [0.2] * 3
