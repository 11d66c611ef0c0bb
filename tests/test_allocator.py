"""Host memory kept for reuse: the first steps' page faults measured, glibc tuned when many."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch
from conftest import pattern_blocks, tiny_model

import amptrain
from amptrain import allocator
from amptrain.config import FitOptions
from amptrain.errors import ConfigError

pytestmark = pytest.mark.skipif(allocator.glibc() is None, reason="glibc's malloc only")

# Step n fills a (4 + n) MiB buffer: each is larger than the block glibc last freed, so by
# default it comes from fresh mmap pages, first-touched (256 faults per MiB).
STEPS = """
import json, torch
from amptrain.allocator import StepFaults
faults = StepFaults({choice!r}, torch.device("cpu"))
for n in range(1, 10):
    with faults.step(n):
        buffer = torch.ones((4 + n) << 18)
        del buffer
print(json.dumps(faults.record))
"""


# Eight 4 MiB buffers a step, freed together, with freed memory kept: the faults per step.
KEPT = """
import json, resource, torch
from amptrain.allocator import keep_freed_memory
assert keep_freed_memory().startswith("mallopt(")
counts = []
for n in range(6):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.ones(1 << 20) for _ in range(8)]
    del buffers
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps(counts))
"""


def _last_line(script: str) -> Any:
    # A process of its own: the settings are process-wide and stay.
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _record(choice: str) -> dict:
    return _last_line(STEPS.format(choice=choice))


def test_steps_that_fault_get_freed_memory_kept_and_stop_faulting():
    record = _record("auto")
    assert record["allocator"] == "kept", record
    assert record["allocator_faults_per_step"] > allocator.FAULTS_PER_STEP
    # steps 7-9 counted again, kept memory reused: far fewer faults than before
    assert record["allocator_faults_after"] < record["allocator_faults_per_step"] / 1.5, record
    assert "mallopt(M_TRIM_THRESHOLD=1024 MiB" in record["allocator_reason"]


def test_kept_memory_is_reused_without_faults():
    """glibc's default refaults ~8,000 pages a step here (trims or mmaps); kept, none."""
    first, *_, last3, last2, last1 = _last_line(KEPT)
    assert first > 8000  # the first step touches its 32 MiB
    assert max(last3, last2, last1) < 64


def test_system_leaves_malloc_alone_and_says_so():
    record = _record("system")
    assert record == {"allocator": "system", "allocator_reason": "asked for (allocator='system')"}


def test_a_short_run_records_that_it_measured_nothing():
    result = amptrain.fit(tiny_model(), pattern_blocks(16), max_steps=2, batch_size=4,
                          eval_every=2)  # fmt: skip
    assert result.fast_path["allocator"] == "system"
    assert "ended before step 6" in result.fast_path["allocator_reason"]


def test_the_device_decides_before_any_count():
    faults = allocator.StepFaults("auto", torch.device("meta"))
    with faults.step(3):
        pass
    assert faults.record["allocator_reason"] == "meta: host memory is not the step's"


def test_fsdp_and_a_tuned_environment_are_left_alone(monkeypatch):
    sharded = allocator.StepFaults("auto", torch.device("cpu"), sharded=True)
    assert sharded.record["allocator_reason"].startswith("sharded: FSDP frees")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    tuned = allocator.StepFaults("auto", torch.device("cpu"))
    assert tuned.record == {
        "allocator": "system",
        "allocator_reason": "MALLOC_MMAP_THRESHOLD_ set in the environment: left as set",
    }


def test_an_unknown_allocator_is_refused_by_name():
    with pytest.raises(ConfigError, match="allocator.*'jemalloc'.*auto, system"):
        FitOptions(allocator="jemalloc")
