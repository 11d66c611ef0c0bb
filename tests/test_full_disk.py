"""A disk that fills during training, for real: the run's folder on a small tmpfs, filled once its
first checkpoint is sealed. One process, two DDP processes and two FSDP processes (sharded
checkpoint) each end in exit 3 with one line naming the checkpoint that failed, and the last
good checkpoint verifies and resumes once space is freed. Needs root to mount a tmpfs (CI runs
as root); skipped elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from amptrain import checkpoint

pytestmark = pytest.mark.slow

ARGS = ["--device", "cpu", "--layers", "2", "--width", "64", "--heads", "2", "--context", "32",
        "--batch-size", "4", "--precision", "fp32", "--no-compile", "--no-progress",
        "--checkpoint-every", "100", "--out", "runs"]  # fmt: skip


@pytest.fixture
def small_disk():
    folder = Path(tempfile.mkdtemp(prefix="amptrain-disk-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        folder.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob("runs/*/checkpoints/step-*/manifest.json"))


PROCESSES = {"one": [], "ddp": ["--nproc", "2"], "fsdp": ["--nproc", "2", "--strategy", "fsdp"]}


@pytest.mark.parametrize("processes", PROCESSES.values(), ids=PROCESSES.keys())
def test_a_disk_full_mid_run_is_exit_3_and_the_last_checkpoint_resumes(processes, small_disk):
    command = [sys.executable, "-m", "amptrain", "train", *processes, *ARGS]
    log = (small_disk / "log.txt").open("w")
    run = subprocess.Popen([*command, "--max-steps", "400"], cwd=small_disk, stdout=log,
                           stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not _checkpoints(small_disk) and time.monotonic() < deadline:
            assert run.poll() is None, (small_disk / "log.txt").read_text()
            time.sleep(0.02)
        (kept,) = _checkpoints(small_disk)
        room = os.statvfs(small_disk)
        with open(small_disk / "filler", "wb") as filler:  # leave 256 KiB: not a checkpoint
            filler.write(b"\0" * max(0, room.f_bavail * room.f_frsize - 256 * 1024))
        assert run.wait(timeout=300) == 3
    finally:
        run.kill()
    said = (small_disk / "log.txt").read_text()
    lines = [line for line in said.splitlines() if line.startswith("amptrain")]
    assert len(lines) == 1 and "Traceback" not in said, said
    assert "could not write" in lines[0]  # and the cause: ENOSPC, or torch's writer cut short
    assert "No space left on device" in lines[0] or "MiB free there" in lines[0]
    assert "earlier checkpoints are untouched" in lines[0]
    assert _checkpoints(small_disk) == [kept] and checkpoint.verify(kept) is None
    (small_disk / "filler").unlink()
    resumed = subprocess.run([*command, "--resume", "auto", "--max-steps", "400"],
                             cwd=small_disk, capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"from {kept.name}" in " ".join(resumed.stderr.split())
