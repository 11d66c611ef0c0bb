"""Launching on GPUs and resuming on other ones, checked on the CPU: one-line refusals before
anything starts, the backend the device asks for, and decisions that every rank shares."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from spawning import spawn

from amptrain import checkpoint_state, decisions, distributed, rng
from amptrain.cli import main
from amptrain.errors import ConfigError
from amptrain.precision import resolve


@pytest.fixture
def gpus(monkeypatch):
    """Make this machine look like one with `n` GPUs."""

    def have(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return have


def test_more_processes_than_gpus_are_refused_before_anything_starts(gpus):
    gpus(1)
    with pytest.raises(ConfigError, match=r"--nproc 2 needs one GPU per process and 1 GPU"):
        distributed.check_processes(2, "auto")
    with pytest.raises(ConfigError, match="each process takes the GPU of its local rank"):
        distributed.check_processes(2, "cuda:0")
    distributed.check_processes(2, "cpu")  # CPU processes: as many as asked
    distributed.check_processes(1, "cuda")
    gpus(2)
    distributed.check_processes(2, "cuda")


def test_the_cli_refuses_nproc_above_the_visible_gpus_in_one_line(tmp_path, capsys):
    code = main(["train", "--nproc", "2", "--device", "cuda", "--out", str(tmp_path),
                 "--max-steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--nproc 2 needs one GPU per process and 0 GPU(s)" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("auto", "nccl")])
def test_cpu_processes_on_a_gpu_machine_join_gloo(device, backend, gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    joined = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: joined.append(backend))  # fmt: skip
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: joined.append(index))
    device_of_rank = distributed.init_from_env(device)
    assert joined == ([1, "nccl"] if backend == "nccl" else ["gloo"])
    assert device_of_rank.type == ("cuda" if backend == "nccl" else "cpu")


def test_two_processes_on_a_node_with_one_gpu_are_refused(gpus, monkeypatch):
    gpus(1)  # two "nodes" on one host: each local rank 0, or 2 local ranks on 1 GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match="1 GPU"):
        distributed.init_from_env("auto")


def test_the_tests_see_no_gpu_unless_they_ask_for_one():
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""


def test_a_checkpoint_from_more_gpus_restores_the_generator_the_run_drew_from(
    gpus, monkeypatch, caplog
):
    gpus(1)
    restored = []

    def set_rng_state(state, index):
        if index >= torch.cuda.device_count():
            raise IndexError("tuple index out of range")  # what torch raises there
        restored.append((int(state[0]), index))

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    state = rng.state()
    state["cuda"] = [torch.full((16,), g, dtype=torch.uint8) for g in (7, 9)]  # 2 GPUs then
    state["cuda_device"] = 1  # the run trained on cuda:1
    checkpoint_state.set_rng_state(state, torch.device("cuda", 0))  # and resumes on cuda:0 now
    assert restored == [(9, 0)]
    del state["cuda_device"]  # a checkpoint written before the index was kept
    restored.clear()
    with caplog.at_level(logging.WARNING, logger="amptrain"):
        checkpoint_state.set_rng_state(state, torch.device("cuda", 0))
    assert restored == [(7, 0)] and "generators of 2 GPUs and 1 are visible" in caplog.text


def _case_decide(rank, tmp):
    os.environ["AMPTRAIN_CACHE_DIR"] = f"{tmp}/cache-{rank}"  # each rank its own cache
    caps = resolve("fp32", "cpu").probe
    decisions.record(caps, ["fp32", "bf16"][rank], "recorded by this rank's cache", True)
    Path(f"{tmp}/decided-{rank}.json").write_text(json.dumps(resolve("auto", "cpu").name))


@pytest.mark.slow
def test_ranks_with_different_caches_train_in_rank_0s_precision(tmp_path):
    spawn("test_launch", "decide", tmp_path)
    decided = [json.loads((tmp_path / f"decided-{r}.json").read_text()) for r in (0, 1)]
    assert decided == ["fp32", "fp32"]


def test_a_rank_other_than_0_takes_rank_0s_compile_record(monkeypatch):
    from conftest import pattern_blocks, tiny_model

    import amptrain
    from amptrain import autocompile

    rank_0s = {"saving": 0.5, "compile_s": 1.0, "runs": 3}
    seen = []
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # this process: rank 1
    monkeypatch.setattr(distributed, "broadcast", lambda obj: rank_0s if obj is None else obj)

    def no_local_record(key):
        raise AssertionError("rank 1 read its own compile record")

    def measure_eager(time_passes, steps, accum, autocast, recorded):
        seen.append(recorded)
        return autocompile.forced(False)

    monkeypatch.setattr(autocompile, "load_record", no_local_record)
    monkeypatch.setattr(autocompile, "measure_eager", measure_eager)
    amptrain.fit(tiny_model(), pattern_blocks(16), precision="fp32", batch_size=4, max_steps=2,
                 compile="auto")  # fmt: skip
    assert seen == [rank_0s]
