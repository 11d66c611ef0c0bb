"""Metrics: pure meters, the sink protocol with its built-in sinks, and the in-memory tracker."""

from __future__ import annotations

from amptrain.metrics.meters import Throughput
from amptrain.metrics.sinks import METRIC_NAMES, CsvSink, JsonlSink, MemorySink, Sink
from amptrain.metrics.tracker import Tracker

__all__ = [
    "METRIC_NAMES",
    "CsvSink",
    "JsonlSink",
    "MemorySink",
    "Sink",
    "Throughput",
    "Tracker",
]
