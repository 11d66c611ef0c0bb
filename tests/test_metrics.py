from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from amptrain.metrics import CsvSink, JsonlSink, Throughput, Tracker
from amptrain.runs import atomic_write_json


def test_throughput_with_a_fake_clock():
    meter = Throughput(start=10.0)
    meter.update(tokens=300)
    meter.update(tokens=100)
    assert meter.compute(now=12.0) == {"perf/tokens_per_s": 200.0, "perf/step_time_s": 1.0}
    meter.update(tokens=50)
    assert meter.compute(now=12.5)["perf/tokens_per_s"] == 100.0


def test_file_sinks_read_back(tmp_path):
    jsonl, table = JsonlSink(tmp_path / "m.jsonl"), CsvSink(tmp_path / "m.csv")
    for sink in (jsonl, table):
        sink.log({"train/loss": 2.5, "mem/source": "process-rss"}, step=1)
        sink.log({"val/loss": math.nan}, step=2)
        sink.close()
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "train/loss": 2.5, "mem/source": "process-rss"},
                     {"step": 2, "val/loss": None}]  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert rows[0]["train/loss"] == "2.5" and rows[1]["val/loss"] == "nan"


def test_tracker_finds_the_best_evaluation_and_builds_tables():
    tracker = Tracker()
    tracker.log({"train/loss": 3.0}, 1)
    tracker.log({"val/loss": 2.0, "val/accuracy": 0.1}, 1)
    tracker.log({"val/loss": 1.5, "val/accuracy": 0.2}, 2)
    tracker.log({"val/loss": 1.7, "val/accuracy": 0.3}, 3)
    assert tracker.best()["step"] == 2
    assert tracker.best("val/accuracy", "max")["step"] == 3
    table = tracker.table()
    rows = table.to_dict("records") if hasattr(table, "to_dict") else table
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_atomic_json_leaves_no_temp_file_and_nulls_nonfinite(tmp_path):
    path = atomic_write_json(tmp_path / "s.json", {"a": math.inf, "b": [1.0, math.nan]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


class _Holds:
    """A callback that allocates and touches `mib` MiB at the first step and holds it to the end."""

    def __init__(self, mib: int) -> None:
        self.mib, self.held = mib, None

    def on_fit_start(self, state):
        pass

    def on_step_end(self, state, metrics):
        if self.held is None and self.mib:
            self.held = torch.ones(self.mib * 2**20 // 4)  # fp32: 4 bytes each, every page touched

    def on_eval_end(self, state, metrics):
        pass

    def on_fit_end(self, state):
        self.held = None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's resettable peak")
def test_each_run_reports_its_own_peak_memory_and_a_known_extra_allocation():
    from conftest import pattern_blocks, tiny_model

    import amptrain

    def peak(mib: int) -> float:
        result = amptrain.fit(tiny_model(), pattern_blocks(16), precision="fp32", batch_size=4,
                              max_steps=3, compile=False, allocator="system",
                              callbacks=[_Holds(mib)])  # fmt: skip
        assert result.mem_source == "process-rss"
        return result.peak_mem_mb

    big, small, big_again = peak(256), peak(0), peak(256)
    assert small < big - 200  # the second, smaller run does not report the first one's peak
    for run in (big, big_again):
        assert run - small == pytest.approx(256, rel=0.1)
