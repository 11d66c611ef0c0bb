"""Where a benchmark result came from, and the one way every result file is written.

Every result file records the commit (and whether the working tree had changes), the date, the
command line, the machine (CPU model and ISA, threads and cores, the load average before and
after), and the torch and Python versions. A run writes a new file, named by the benchmark, the
machine and the time; an existing file is never overwritten, so a figure quoted from one keeps
its source. `--quick` runs (a smoke test that the script works) go to `results/quick/`, which
git ignores.

    meta = provenance.start("peers")           # before measuring: the load before
    ...
    provenance.write(args.out or provenance.result_file("peers-gpt", args.quick), meta, payload)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
# The CPU flags that decide how fast a precision runs here.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")
FIELDS = ("benchmark", "commit", "dirty", "date", "command", "machine", "torch", "python")
"""What every result file carries (a test checks each committed file for them)."""


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9B14"), or the platform's processor string."""
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The flags of `ISA_FLAGS` this CPU has."""
    flags = next((line.split(":", 1)[1].split() for line in _cpuinfo()
                  if line.startswith("flags")), [])  # fmt: skip
    return [flag for flag in ISA_FLAGS if flag in flags]


def cpu_isa() -> str:
    """The widest relevant ISA: amx, avx512bf16, avx512, avx2 or no-avx2."""
    flags = cpu_flags()
    for flag, name in (("amx_bf16", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512f", "avx512")):
        if flag in flags:
            return name
    return "avx2" if "avx2" in flags else "no-avx2"


def cpu_slug() -> str:
    """The CPU for result file names (`amd-epyc-avx512bf16`)."""
    return re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") + "-" + cpu_isa()


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def machine() -> dict:
    """The machine a result was measured on."""
    return {"cpu": cpu_model(), "isa": cpu_isa(), "cpu_flags": cpu_flags(),
            "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_before": os.getloadavg()[0]}  # fmt: skip


def start(benchmark: str) -> dict:
    """The provenance record of a run that starts now (call it before measuring)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "benchmark": benchmark,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def result_file(stem: str, quick: bool = False) -> Path:
    """A new file: results/<stem>-<cpu>-<isa>-t<threads>-torch<version>-<UTC time>.json."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stem}-{cpu_slug()}-t{torch.get_num_threads()}-torch{torch.__version__}-{stamp}"
    return (RESULTS / "quick" if quick else RESULTS) / f"{name.replace('+', '-')}.json"


def write(path: Path, meta: dict, payload: dict) -> Path:
    """Write `meta` (from `start`, the load after added) and `payload` to a new file `path`.

    Atomic (a reader never sees half a file) and never over an existing file: a second run
    with the same `--out` is refused with the way out.
    """
    meta = {**meta, "machine": {**meta["machine"], "load_after": os.getloadavg()[0]}}
    text = json.dumps({**meta, **payload}, indent=2, default=str) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)  # fails if `path` exists: results are never overwritten
    except FileExistsError:  # the measurement is kept where it was written
        sys.exit(f"{path} exists; result files are never overwritten: this run's result is in "
                 f"{tmp}; rename it, or give a new --out")  # fmt: skip
    except OSError:  # a filesystem without hard links: create the file exclusively instead
        with open(path, "x") as f:
            f.write(text)
    tmp.unlink()
    load = meta["machine"]
    print(f"\nwritten to {path}")
    if load["load_before"] > 0.5 * (load["cores"] or 1):  # after: the benchmark's own load too
        print(f"LOAD {load['load_before']:.1f} before the run on {load['cores']} cores: other jobs "
              "were running; rerun alone for figures of time")  # fmt: skip
    return path
