"""CUDA-only branches of the loop, the loss, the weights file and the doctor, on the CPU.

Each test makes the CPU behave as the CUDA branch needs (a copy to the host that is a new
storage, pinned memory, an allocator that runs out) and checks what the branch does.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from amptrain import losses, step
from amptrain.cli import main
from amptrain.runs import atomic_safetensors_save


def test_a_gpu_chunk_of_the_loss_is_not_launch_bound():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert losses.chunk_rows(50_257, cpu) == 83  # tuned for a CPU's caches
    assert losses.chunk_rows(50_257, cuda) == 1335  # 256 MiB of fp32 rows


def test_batches_go_to_a_gpu_from_pinned_memory_without_blocking(monkeypatch):
    moves = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: moves.append("pin") or t)
    real_to = torch.Tensor.to

    def to(t, device, non_blocking=False):
        moves.append(("to", str(device), non_blocking))
        return real_to(t, "cpu")

    monkeypatch.setattr(torch.Tensor, "to", to)
    ids = torch.zeros(2, 4, dtype=torch.long)
    step.to_device((ids, ids), torch.device("cuda", 0))
    assert moves == ["pin", ("to", "cuda:0", True)] * 2


def test_tied_weights_on_a_gpu_are_written_once(tmp_path, monkeypatch):
    # A GPU tensor's copy to the host is a new storage each time: ties must be found before it.
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: t.clone())
    shared = torch.randn(8, 4)
    path = tmp_path / "model.safetensors"
    atomic_safetensors_save({"wte.weight": shared, "lm_head.weight": shared, "b": torch.ones(3)},
                            path)  # fmt: skip
    assert set(load_file(path)) == {"wte.weight", "b"}  # the head is the embedding, by name


def test_the_doctor_out_of_memory_is_one_line_with_advice(tmp_path, capsys, monkeypatch):
    import importlib

    audit_mod = importlib.import_module("amptrain.doctor.audit")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore\nlines")

    monkeypatch.setattr(audit_mod, "train_step", out_of_memory)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    code = main(["doctor", "--data", str(corpus), "--layers", "1", "--width", "32", "--heads",
                 "2", "--context", "32", "--batch-size", "4", "--batches", "1", "--no-progress",
                 "--out", str(tmp_path / "runs")])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("amptrain:")]
    assert code == 3 and len(err) == 1, err
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in err[0]
    assert "lower --batch-size" in err[0]


def test_the_cuda_timer_times_back_to_back_matmuls_between_events_after_a_warm_up(monkeypatch):
    import contextlib

    from amptrain import matmul_timing

    calls = []

    class Event:  # a CUDA event: recorded on the device's stream, read after a sync
        def __init__(self, enable_timing):
            self.at = None

        def record(self, stream):
            assert stream == "stream of cuda:1"
            self.at = len(calls)  # how many matmuls ran before it

        def synchronize(self):
            calls.append("sync")

        def elapsed_time(self, end):
            return 2.0 * (end.at - self.at)  # 2 ms a matmul

    class Matrix:
        def __matmul__(self, other):
            calls.append("matmul")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(matmul_timing, "_operands", lambda *args: (Matrix(), Matrix()))
    with matmul_timing.cuda_timer(torch.device("cuda", 1)) as timer:
        seconds = timer("bf16", (64, 64, 64), 5)
    assert calls == ["matmul"] * 6 + ["sync"]  # the warm-up, then 5 timed, one sync at the end
    assert seconds == pytest.approx(5 * 0.002)


def test_a_run_on_a_gpu_resets_and_reads_that_gpus_peak(monkeypatch):
    from amptrain import hardware

    seen = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: seen.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: seen.append(("read", d))
                        or 3 * 2**20)  # fmt: skip
    gpu = torch.device("cuda", 1)
    hardware.reset_peak_memory(gpu)
    assert hardware.peak_memory_mb(gpu) == (3.0, "cuda-allocator")
    assert seen == [("reset", gpu), ("read", gpu)]  # the run's own GPU, not the current one
