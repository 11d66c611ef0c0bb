"""Stopping under several processes agrees on logging steps only, and nothing is lost by it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import pattern_blocks, tiny_model
from spawning import spawn

import amptrain
from amptrain import distributed, interrupts, loop, stepping
from amptrain.callbacks import Callback
from amptrain.errors import Interrupted
from amptrain.metrics import MemorySink


def test_a_signal_during_the_agreement_waits_for_the_next_one(monkeypatch):
    state = loop.TrainState()
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))

    def all_reduce(values, op):
        state.stop_requested = signal.SIGTERM  # the handler runs while the rank waits here
        return [0, 0]  # no rank had asked when the values were sent

    monkeypatch.setattr(distributed, "all_reduce", all_reduce)
    interrupts.agree_on_stop(state, synced=True)
    assert not state.should_stop and state.stop_requested == signal.SIGTERM  # kept
    monkeypatch.setattr(distributed, "all_reduce", lambda values, op: list(values))
    interrupts.agree_on_stop(state, synced=False)  # between logging steps: no collective, no stop
    assert not state.should_stop
    interrupts.agree_on_stop(state, synced=True)
    assert state.should_stop and state.stop_signal == signal.SIGTERM


def test_one_process_logs_the_step_a_signal_stopped(monkeypatch):
    real, calls = stepping.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the step
        return real(*args, **kwargs)

    monkeypatch.setattr(stepping, "train_step", step)
    sink = MemorySink()
    with pytest.raises(Interrupted) as stopped:
        amptrain.fit(tiny_model(), pattern_blocks(32), precision="fp32", batch_size=4,
                     max_steps=20, log_every=10, handle_signals=True, compile=False,
                     sinks=[sink])  # fmt: skip
    assert stopped.value.step == 3
    assert [r["step"] for r in sink.records if "train/loss" in r] == [3]  # its metrics row


class _StopAtStart(Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_fit_start(self, state) -> None:
        state.should_stop = self.rank == 0  # one rank only


def _case_stop_at_start(rank, tmp):
    result = amptrain.fit(tiny_model(), pattern_blocks(32), precision="fp32", batch_size=4,
                          max_steps=5, compile=False, callbacks=[_StopAtStart(rank)])  # fmt: skip
    Path(tmp, f"steps-{rank}.json").write_text(json.dumps(result.steps))


@pytest.mark.slow
def test_a_stop_asked_on_one_rank_before_the_first_step_stops_every_rank(tmp_path):
    spawn("test_stop_agreement", "stop_at_start", tmp_path)  # a divergence would hang or fail
    assert [json.loads((tmp_path / f"steps-{r}.json").read_text()) for r in (0, 1)] == [0, 0]
