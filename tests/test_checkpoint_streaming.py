"""A checkpoint streams to disk: its states are never whole in memory, and a save that runs out
of disk or memory part-way is one error that keeps every earlier checkpoint."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_names, checkpoint_payload, step_name

from amptrain import checkpoint, hardware
from amptrain.checkpoint import CheckpointWriteError

TENSOR_MIB, TENSORS = 32, 8


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's resettable peak")
def test_a_save_adds_about_one_tensor_to_the_peak(tmp_path):
    payload = checkpoint_payload(1)
    payload["model"] = {f"w{i}": torch.randn(TENSOR_MIB * 2**20 // 4) for i in range(TENSORS)}
    _, added, _ = hardware.measure_memory(  # a forked worker: the payload is already resident
        torch.device("cpu"), lambda: checkpoint.save(tmp_path, 1, payload, {"step": 1})
    )
    assert added < 2 * TENSOR_MIB  # in memory, the whole 256 MiB state would be added
    loaded = checkpoint.load(checkpoint.latest(tmp_path))
    assert all(torch.equal(loaded.tensors["model"][k], v) for k, v in payload["model"].items())


def test_a_disk_that_fills_mid_stream_is_the_disk_error(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, checkpoint_payload(1), {"step": 1})
    real = checkpoint._HashingWriter.write

    def write(self, data):
        if self.size > 100:  # part-way through a state torch is writing
            self.file.write = _raise_enospc
        return real(self, data)

    monkeypatch.setattr(checkpoint._HashingWriter, "write", write)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
        checkpoint.save(tmp_path, 2, checkpoint_payload(2), {"step": 2})
    assert step_name(2) in str(info.value) and "earlier checkpoints are untouched" in str(
        info.value
    )
    assert checkpoint_names(tmp_path) == [step_name(1)] and not list(tmp_path.glob(".tmp-*"))


def _raise_enospc(data):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_running_out_of_memory_in_a_save_is_a_write_error(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, checkpoint_payload(1), {"step": 1})

    def out_of_memory(value, file):
        raise MemoryError

    monkeypatch.setattr(torch, "save", out_of_memory)
    with pytest.raises(CheckpointWriteError, match="out of memory; earlier checkpoints"):
        checkpoint.save(tmp_path, 2, checkpoint_payload(2), {"step": 2})
    assert checkpoint_names(tmp_path) == [step_name(1)] and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's resettable peak")
def test_the_final_weights_are_written_without_a_copy_in_memory(tmp_path):
    from amptrain.runs import atomic_safetensors_save

    state = {f"w{i}": torch.randn(TENSOR_MIB * 2**20 // 4) for i in range(TENSORS)}
    path = tmp_path / "model.safetensors"
    _, added, _ = hardware.measure_memory(
        torch.device("cpu"), lambda: atomic_safetensors_save(state, path)
    )
    assert added < 2 * TENSOR_MIB and path.stat().st_size > TENSORS * TENSOR_MIB * 2**20


def test_the_same_weights_give_the_same_bytes(tmp_path):
    from amptrain.runs import atomic_safetensors_save

    shared, other = torch.randn(4, 4), torch.ones(3)
    first = {"a": shared, "tied_b": shared, "c": other, "tied_d": other}
    second = {"c": other, "tied_d": other, "a": shared, "tied_b": shared}  # another order
    atomic_safetensors_save(first, tmp_path / "one.safetensors")
    atomic_safetensors_save(second, tmp_path / "two.safetensors")
    one, two = (tmp_path / f"{n}.safetensors" for n in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()
    for _ in range(5):  # and again: a hash map's order would differ from save to save
        atomic_safetensors_save(first, two)
        assert two.read_bytes() == one.read_bytes()
    from safetensors.torch import load_file

    loaded = load_file(one)
    assert set(loaded) == {"a", "c"} and torch.equal(loaded["a"], shared)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                   torch.bool, torch.uint8])  # fmt: skip
def test_safetensors_reads_every_dtype_and_shape_written(tmp_path, dtype):
    from safetensors.torch import load_file

    from amptrain.runs import atomic_safetensors_save

    state = {"m": (torch.randn(3, 5) * 10).to(dtype), "s": torch.tensor(7).to(dtype),
             "e": torch.empty(0, 4, dtype=dtype)}  # fmt: skip
    atomic_safetensors_save(state, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == dtype for k, v in state.items())


def test_keep_last_removes_a_checkpoint_that_cannot_be_resumed(tmp_path):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, checkpoint_payload(step), {"step": step}, keep_last=3)
    (tmp_path / step_name(1) / "model.pt").write_bytes(b"flipped")  # fails verification
    checkpoint.save(tmp_path, 3, checkpoint_payload(3), {"step": 3}, keep_last=3)
    assert checkpoint_names(tmp_path) == [step_name(2), step_name(3)]


def test_a_new_start_removes_what_a_killed_process_left_half_written(tmp_path, corpus):
    from amptrain.cli import main

    out = tmp_path / "runs"
    args = ["train", "--data", str(corpus), "--layers", "1", "--width", "16", "--heads", "2",
            "--context", "16", "--batch-size", "4", "--precision", "fp32", "--max-steps", "2",
            "--checkpoint-every", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    (run,) = out.iterdir()
    left = [".model.safetensors.tmp-999999", ".metrics.jsonl.tmp-999999", ".loss.png.tmp.png"]
    for name in left:
        (run / name).write_bytes(b"half")
    (run / ".hf.tmp-999999").mkdir()
    assert main([*args[:-2], "--max-steps", "3", "--resume", "auto", "--out", str(out)]) == 0
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_a_resume_on_changed_data_is_refused_before_anything_changes(tmp_path, capsys):
    from amptrain.cli import main

    corpus, out = tmp_path / "corpus.txt", tmp_path / "runs"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    args = ["train", "--data", str(corpus), "--layers", "1", "--width", "16", "--heads", "2",
            "--context", "16", "--batch-size", "4", "--precision", "fp32", "--max-steps", "2",
            "--checkpoint-every", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    (run,) = out.iterdir()
    corpus.write_text("a different text entirely, of the same kind of length. " * 160)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main([*args, "--max-steps", "3", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert f"--data {corpus} changed since step-000000002 was saved" in " ".join(err.split())
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
