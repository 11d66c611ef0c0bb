"""`benchmarks/gpu_check.py` runs end to end on the CPU (`--dry-run`), so it cannot rot before a
GPU comes: every step it takes on a GPU is taken here, tiny."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_the_cpu_and_writes_its_result(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("gpu-check-*.json")
    report = json.loads(path.read_text())
    assert report["dry_run"] and report["commit"] and "gpu_check.py --dry-run" in report["command"]
    assert report["complete"] and report["probe"]["auto"] in ("fp32", "bf16")
    assert "needs an NVIDIA GPU" in report["train"]["tf32"]["error"]  # refused on a CPU
    for name in ("fp32", "bf16"):
        row = report["train"][name]
        assert row["steps"] == 4 and row["tokens_per_s"] > 0 and row["peak_mem_mb"] > 0
    assert {name: row["exit_code"] for name, row in report["commands"].items()} == {
        "bench": 0, "doctor": 0, "train": 0, "resume": 0}  # fmt: skip
    assert "resumed" in report["commands"]["resume"]["output_tail"]
    # A second run never overwrites the first one's result.
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    again = gpu_check.result_path(tmp_path, {**report, "date": "2026-12-06T18:00:00+00:00"})
    assert again != path and again.name.endswith("-20261206T180000.json")
