"""Host reads only where they are asked for: none on a step that is not a logging step.

Every host read of a tensor (`item`, `tolist`, `bool`, `float`, `int`) is counted from the start
of one step to the start of the next, so the count covers the whole iteration: the step, its
counters, logging, agreeing on a stop across processes, evaluation and checkpoints. On a GPU a
host read is a synchronisation that drains the queue of kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import HostReads, pattern_blocks, tiny_model
from spawning import spawn

import amptrain
from amptrain import step_metrics, stepping

STEPS, LOG_EVERY = 7, 3
QUIET = [1, 2, 4, 5]  # neither logging (3, 6), nor last (7), nor evaluation or checkpoint


def _reads_per_iteration(monkeypatch=None, **fit_options) -> tuple[list[int], amptrain.FitResult]:
    reads, counts = HostReads(monkeypatch), []
    step = stepping.train_step

    def counted(*args, **kwargs):
        if reads.on:
            counts.append(reads.count)  # the iteration before this step, whole
        reads.on, reads.count = True, 0
        return step(*args, **kwargs)

    if monkeypatch is not None:
        monkeypatch.setattr(stepping, "train_step", counted)
    else:
        stepping.train_step = counted
    result = amptrain.fit(tiny_model(), pattern_blocks(32), precision="fp32", batch_size=4,
                          max_steps=STEPS, log_every=LOG_EVERY, compile=False,
                          **fit_options)  # fmt: skip
    return counts, result


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_one_process_reads_nothing_on_a_step_that_does_not_log(monkeypatch, impl):
    counts, result = _reads_per_iteration(monkeypatch, optimizer_impl=impl)
    assert len(counts) == STEPS - 1  # iterations 1-6, each up to the next step's start
    # The foreach kernel cannot skip a non-finite step on the device: one read decides.
    quiet = 0 if impl == "fused" else 1
    assert [counts[s - 1] for s in QUIET] == [quiet] * len(QUIET), counts
    assert counts[LOG_EVERY - 1] > quiet  # the logging step reads its counters
    assert [r["step"] for r in result.history if "train/loss" in r] == [3, 6, 7]


def _case_reads(rank, tmp):
    counts, _ = _reads_per_iteration(optimizer_impl="fused")
    (Path(tmp) / f"reads-{rank}.json").write_text(json.dumps(counts))


@pytest.mark.slow
def test_two_processes_read_nothing_on_a_step_that_does_not_log(tmp_path):
    spawn("test_host_syncs", "reads", tmp_path)
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"reads-{rank}.json").read_text())
        assert [counts[s - 1] for s in QUIET] == [0] * len(QUIET), (rank, counts)
        assert counts[LOG_EVERY - 1] > 0


def test_step_time_is_per_step_whatever_the_logging_interval(monkeypatch):
    clock = iter(range(0, 10_000, 2))  # every read of the loop's clock is 2 s later
    fake = lambda device: float(next(clock))  # noqa: E731
    monkeypatch.setattr(stepping, "device_clock", fake)  # the loop's reads and the logged step's
    monkeypatch.setattr(step_metrics, "device_clock", fake)
    result = amptrain.fit(tiny_model(), pattern_blocks(32), precision="fp32", batch_size=4,
                          max_steps=20, log_every=10, compile=False)  # fmt: skip
    times = [r["perf/step_time_s"] for r in result.history if "train/loss" in r]
    assert times == [pytest.approx(2 / 10)] * 2  # one clock read per log: 2 s over 10 steps
