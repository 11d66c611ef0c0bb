"""Every benchmark script runs (`--quick`), and every result file says where it came from.

A benchmark that rots is found here, not on the day someone needs its figure; the statistic
every ratio uses (`benchmarks/rounds.py`) and the one writer of result files
(`benchmarks/provenance.py`) are checked against known cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import provenance  # noqa: E402
import rounds  # noqa: E402

LIBRARIES = {
    "rounds.py",
    "provenance.py",
    "peers_arms.py",
    "fresh.py",
    "levers_quality.py",
    "levers_largest.py",
}  # imported by the scripts
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in LIBRARIES)
# gpu_check.py has a dry run of its own (tests/test_gpu_check.py); profile_step.py prints only.
WRITES = [s for s in SCRIPTS if s not in ("gpu_check.py", "profile_step.py")]
# Fewer arms where a script's quick run would spend most of the suite's time on peers it has
# already shown to run the same way.
NARROWER = {"peers.py": ["--arms", "plain,amptrain", "--precisions", "bf16"]}


@pytest.mark.slow
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "gpu_check.py"])
def test_each_benchmark_runs_quick_and_writes_a_result_with_its_provenance(tmp_path, script):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(BENCHMARKS / script), "--quick", *NARROWER.get(script, [])]
    command += ["--out", str(out)] if script in WRITES else []
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    if script not in WRITES:
        return
    record = json.loads(out.read_text())
    assert set(provenance.FIELDS) <= set(record), sorted(record)
    assert f"{script} --quick" in record["command"]  # the command line as it was given
    machine = record["machine"]
    assert machine["cpu"] and machine["isa"] in ("amx", "avx512bf16", "avx512", "avx2", "no-avx2")
    assert machine["threads"] == 1  # OMP_NUM_THREADS=1 here: what torch ran with
    assert "load_before" in machine and "load_after" in machine
    assert len(record["commit"]) == 40 and record["date"].startswith("20")


def test_a_result_file_is_never_overwritten(tmp_path):
    meta = provenance.start("test")
    path = provenance.write(tmp_path / "r.json", meta, {"results": [1]})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left
    with pytest.raises(SystemExit, match="never overwritten: this run's result is in"):
        provenance.write(path, meta, {"results": [2]})
    assert json.loads(path.read_text())["results"] == [1]
    (kept,) = [p for p in tmp_path.iterdir() if p.name != "r.json"]  # the second, not lost
    assert json.loads(kept.read_text())["results"] == [2]


def test_a_new_run_gets_a_new_file_named_by_machine_and_time():
    first = provenance.result_file("peers-gpt")
    assert first.parent == provenance.RESULTS and provenance.cpu_isa() in first.name
    assert provenance.result_file("peers-gpt", quick=True).parent == provenance.RESULTS / "quick"


@pytest.mark.parametrize(
    "rates, base, verdict",
    [
        ([11, 12, 11, 13, 12], [10, 10, 10, 10, 10], "faster in all 5 rounds"),
        ([9, 8, 9, 9, 8], [10, 10, 10, 10, 10], "slower in all 5 rounds"),
        ([11, 9, 11, 12, 11], [10, 10, 10, 10, 10], "inconclusive: the rounds disagree"),
        ([11, 12, 13], [10, 10, 10], "inconclusive: 3 round(s), 5 needed (all 3 agree by "
                                     "chance 25% of the time)"),
    ],
)  # fmt: skip
def test_every_ratio_is_the_ratio_of_medians_with_the_per_round_range(rates, base, verdict):
    got = rounds.ratio(rates, base)
    assert got["ratio_of_medians"] == sorted(rates)[len(rates) // 2] / 10
    assert got["ratio_range"] == [min(rates) / 10, max(rates) / 10]
    assert got["verdict"] == verdict


def test_a_wide_spread_leaves_no_verdict():
    got = rounds.ratio([11, 12, 11, 13, 12], [10] * 5, quiet=False)
    assert got["verdict"].startswith("inconclusive: a spread over 10%")


def test_how_often_all_rounds_agree_by_chance():
    assert rounds.chance_all_agree(3) == 0.25 and rounds.chance_all_agree(5) == 0.0625
