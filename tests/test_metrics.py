from __future__ import annotations

import csv
import json
import math

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
