"""Checkpoint save faults (reliability spec F3, F5): kills, full disks, permissions, rotation.

Every test here interrupts or breaks a checkpoint save on purpose and checks what survives:
the previous complete checkpoint, never a partial `step-*` directory or a temporary, and an
error that names the directory. Corrupt checkpoints and resuming are in
test_checkpoint_resume_faults.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_names, checkpoint_payload, pattern_blocks, step_name, tiny_model

import amptrain
from amptrain import checkpoint
from amptrain.callbacks import Callback
from amptrain.checkpoint import CheckpointError

FIT = dict(precision="fp32", batch_size=4, seed=0)


def temporaries(root: Path) -> list[Path]:
    return sorted(root.glob(".tmp-*"))


def assert_loads_as(path: Path, step: int) -> None:
    ckpt = checkpoint.load(path)
    assert ckpt.trainer["step"] == step
    assert torch.equal(ckpt.tensors["model"]["w"], torch.full((8,), float(step)))


class _Exploding:
    """Pickling it fails, like a process dying in the middle of serialising a payload."""

    def __reduce__(self):
        raise RuntimeError("simulated crash while serialising")


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no `except Exception` handler catches it."""


# F3 Kill during checkpoint write ----------------------------------------------------------------


def test_failing_payload_never_creates_the_step_dir_or_a_partial_file(tmp_path):
    root = tmp_path / "checkpoints"
    first = checkpoint.save(root, 1, checkpoint_payload(1), {"step": 1})
    broken = {**checkpoint_payload(2), "optimizer": {"state": {0: _Exploding()}}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoint.save(root, 2, broken, {"step": 2})
    assert not (root / step_name(2)).exists()
    assert checkpoint_names(root) == [step_name(1)]
    stray = [p for p in root.rglob("*") if p.is_file() and first not in p.parents]
    assert stray == []
    assert checkpoint.latest(root) == first
    assert_loads_as(first, 1)


def test_failing_payload_leaves_no_temporary_dir(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint.save(root, 1, checkpoint_payload(1), {"step": 1})
    broken = {**checkpoint_payload(2), "optimizer": {"state": {0: _Exploding()}}}
    with pytest.raises(RuntimeError):
        checkpoint.save(root, 2, broken, {"step": 2})
    assert temporaries(root) == []


_SAVE_FOREVER = """
import sys
import torch
from amptrain import checkpoint

root = sys.argv[1]
big = torch.zeros(50 * 2**20 // 4)  # 50 MB
for step in range(1, 10_000):
    big[0] = step
    tensors = {"model": {"w": big}, "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": {}}
    checkpoint.save(root, step, tensors, {"step": step}, keep_last=10_000)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_save_never_leaves_a_partial_step_dir(tmp_path):
    root = tmp_path / "checkpoints"
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVE_FOREVER, str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = []
        for _ in range(2):
            line = child.stdout.readline()
            assert line, f"the saving child died early: {child.communicate()[1][-2000:]}"
            seen.append(time.perf_counter())
        time.sleep((seen[1] - seen[0]) / 2)  # half way through the third save
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL  # killed mid-loop, not finished
    found = checkpoint.list_checkpoints(root)
    assert len(found) >= 2
    assert {p.name: checkpoint.verify(p) for p in found} == {p.name: None for p in found}
    newest = checkpoint.latest(root)
    assert newest == found[-1]
    ckpt = checkpoint.load(newest)
    assert ckpt.tensors["model"]["w"][0].item() == ckpt.trainer["step"] == len(found)
    checkpoint.clean_temporaries(root)
    assert temporaries(root) == []
    assert checkpoint.list_checkpoints(root) == found


def test_kill_during_rotation_leaves_no_partial_step_dir(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save(root, step, checkpoint_payload(step), {"step": step}, keep_last=2)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        path = Path(path)
        if (path / "manifest.json").is_file():  # deleting a checkpoint, under whatever name
            sorted(path.iterdir())[0].unlink()  # rmtree removes files one by one...
            raise _Killed  # ...and the process dies after the first
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(_Killed):
        checkpoint.save(root, 3, checkpoint_payload(3), {"step": 3}, keep_last=2)
    monkeypatch.undo()
    checkpoint.clean_temporaries(root)  # what the next run does first
    assert checkpoint.latest(root) == root / step_name(3)
    found = checkpoint.list_checkpoints(root)
    assert {p.name: checkpoint.verify(p) for p in found} == {p.name: None for p in found}


# F5 Disk full or permission denied while saving -------------------------------------------------

ERRORS = {
    "disk-full": (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    "permission": (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
}


def half_written(fail_on: str, error: OSError):
    """A `write_file` that writes half of `fail_on` and then fails, the others whole."""
    real = checkpoint.write_file

    def write(path: Path, payload):
        if path.name == fail_on:
            real(path, payload)
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
            raise error
        return real(path, payload)

    return write


@pytest.mark.parametrize("kind", sorted(ERRORS))
@pytest.mark.parametrize("where", ["model.pt", "manifest.json", "rename"])
def test_failed_save_names_the_dir_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, kind,
                                                                  where):  # fmt: skip
    error, text = ERRORS[kind]
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save(root, step, checkpoint_payload(step), {"step": step}, keep_last=2)
    if where == "rename":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name.startswith("step-"):
                raise error
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(checkpoint.os, "replace", replace)
    else:
        monkeypatch.setattr(checkpoint, "write_file", half_written(where, error))
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(root, 3, checkpoint_payload(3), {"step": 3}, keep_last=1)
    monkeypatch.undo()
    message = str(info.value)
    assert str(root) in message and step_name(3) in message and text in message
    assert isinstance(info.value.__cause__, OSError)
    assert checkpoint_names(root) == [step_name(1), step_name(2)]  # nothing new, nothing rotated
    assert temporaries(root) == []
    assert checkpoint.latest(root) == root / step_name(2)
    for step in (1, 2):
        assert_loads_as(root / step_name(step), step)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_checkpoint_dir_is_a_checkpoint_error(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint.save(root, 1, checkpoint_payload(1), {"step": 1})
    root.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=str(root)):
            checkpoint.save(root, 2, checkpoint_payload(2), {"step": 2})
    finally:
        root.chmod(0o700)
    assert checkpoint_names(root) == [step_name(1)]
    assert_loads_as(root / step_name(1), 1)


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_fit_stops_with_the_checkpoint_error(tmp_path, monkeypatch, kind):
    error, text = ERRORS[kind]
    root = tmp_path / "checkpoints"
    real = checkpoint.write_file

    def write(path: Path, payload):
        if path.parent.name.startswith(f".tmp-{step_name(4)}"):
            raise error
        return real(path, payload)

    monkeypatch.setattr(checkpoint, "write_file", write)
    steps = []

    class Steps(Callback):
        def on_step_end(self, state, metrics) -> None:
            steps.append(state.step)

    with pytest.raises(CheckpointError, match=text) as info:
        amptrain.fit(tiny_model(), pattern_blocks(16), None, callbacks=[Steps()],
                     checkpoint_dir=root, checkpoint_every=2, max_steps=6, **FIT)  # fmt: skip
    assert str(root) in str(info.value) and step_name(4) in str(info.value)
    assert steps == [1, 2, 3, 4]  # no step after the failed save
    assert checkpoint_names(root) == [step_name(2)]
    assert temporaries(root) == []
    assert checkpoint.load(root / step_name(2)).trainer["step"] == 2


# Rotation ---------------------------------------------------------------------------------------


def test_rotation_keeps_exactly_the_newest_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    amptrain.fit(tiny_model(), pattern_blocks(16), None, checkpoint_dir=root, checkpoint_every=1,
                 keep_last=2, max_steps=5, **FIT)  # fmt: skip
    assert checkpoint_names(root) == [step_name(4), step_name(5)]
    assert [checkpoint.load(root / n).trainer["step"] for n in checkpoint_names(root)] == [4, 5]
    assert temporaries(root) == []


# F6 Mid-epoch resume keeps the data order -------------------------------------------------------
