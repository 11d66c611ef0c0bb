"""The memory a run holds, and `micro_batch="auto"`: the largest micro-batch measured to fit a
budget, the global batch kept by accumulation, and a budget nothing fits refused up front."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import pattern_blocks, tiny_model

import amptrain
from amptrain import hardware, memory_plan
from amptrain.cli import main
from amptrain.config import FitOptions
from amptrain.errors import ConfigError
from amptrain.precision import resolve
from amptrain.sizes import parse_size

CPU = torch.device("cpu")


@pytest.mark.parametrize("text, size", [("16GiB", 16 * 2**30), ("12GB", 12 * 10**9),
                                        ("800 MiB", 800 * 2**20), ("1e9", 10**9),
                                        (4096, 4096), ("1.5g", 1_500_000_000)])  # fmt: skip
def test_sizes_read_as_people_write_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "16 GiBs", "-1GB", "0", "lots", "nanGB", "1e999GB"])
def test_a_size_that_is_not_one_is_refused_naming_it(text):
    with pytest.raises(ConfigError, match="is not a size: give bytes with a unit, e.g. 16GiB"):
        FitOptions(memory_budget=text)


def test_the_footprint_counts_the_bytes_each_lever_keeps_a_parameter():
    model = tiny_model(n_layer=2, n_embd=32)
    n = sum(p.numel() for p in model.parameters())
    matrices = sum(p.numel() for p in model.parameters() if id(p) in _castable(model))
    rest = n - matrices
    assert memory_plan.footprint(model, FitOptions())["bytes"] == 16 * n  # fp32 + AdamW
    params = list(model.parameters())
    big = sum(p.numel() for p in params if p.numel() >= 4096)  # bitsandbytes: 8-bit from 4,096
    assert memory_plan.footprint(model, FitOptions(optimizer_state="8bit"))["bytes"] == (
        10 * big + 16 * (n - big))  # fmt: skip
    kahan = FitOptions(weights="bf16")
    assert memory_plan.footprint(model, kahan)["bytes"] == 10 * matrices + 16 * rest
    sr = FitOptions(weights="bf16", compensation="sr")
    assert memory_plan.footprint(model, sr)["bytes"] == 8 * matrices + 16 * rest
    sr8 = FitOptions(weights="bf16", compensation="sr", optimizer_state="8bit")
    rows = {id(p) for p in params  # amptrain's blocks: 64, 128 or 256 values of one row
            if p.numel() >= 4096 and p.dim() == 2 and p.shape[1] % 64 == 0}  # fmt: skip
    assert 0 < len(rows) < len(params)  # width 32: only the MLP's output rows (128) qualify
    cast = _castable(model)
    each = {(True, True): 6, (True, False): 8, (False, True): 10, (False, False): 16}
    sr8_bytes = sum(p.numel() * each[id(p) in cast, id(p) in rows] for p in params)
    assert memory_plan.footprint(model, sr8)["bytes"] == sr8_bytes
    fsdp = memory_plan.footprint(model, FitOptions(strategy="fsdp"), world_size=4)
    assert fsdp["bytes"] == 16 * n // 4
    model.wte.weight.requires_grad_(False)  # frozen: its own 4 bytes
    frozen = model.wte.weight.numel()
    assert memory_plan.footprint(model, FitOptions())["bytes"] == 16 * (n - frozen) + 4 * frozen


def _castable(model):
    from amptrain import low_weights

    return low_weights.castable(model)


def test_a_model_whose_state_exceeds_the_budget_is_refused_before_any_work():
    model = tiny_model(n_layer=2, n_embd=32)
    with pytest.raises(
        ConfigError,
        match=r"take [0-9]+ KiB \(16 bytes a trained parameter\), "
        r"more than the 98 KiB budget \(--memory-budget\); lower it with --precision bf16",
    ):
        amptrain.fit(model, pattern_blocks(16), None, max_steps=1, batch_size=4,
                     memory_budget="100kB")  # fmt: skip


def _big():
    """A model whose activations grow by about 4 MB a block: the probes tell sizes apart."""
    return tiny_model(vocab_size=2048, block_size=128, n_embd=64)


def _peak(model, blocks, micro, mode="none", opts=None):
    prec = resolve("fp32", CPU)
    return memory_plan.probe_step(model, blocks, prec, opts or FitOptions(), micro, mode)


def test_the_plan_takes_the_largest_micro_batch_that_fits_and_accumulates_the_rest():
    model, blocks = _big(), pattern_blocks(64, context=128)
    budget = (_peak(model, blocks, 4) + _peak(model, blocks, 8)) / 2
    opts = FitOptions(batch_size=16, micro_batch="auto", memory_budget=str(int(budget)))
    planned, record = memory_plan.plan(model, blocks, resolve("fp32", CPU), opts)
    assert (planned.batch_size, planned.grad_accum) == (4, 4)  # 8 does not fit, 4 does
    assert planned.micro_batch is None and record["asked"] == "16 x 1"
    assert [p["micro_batch"] for p in record["probes"]] == [16, 4, 8]  # a bisection
    assert all(p["peak_mb"] * 2**20 <= budget for p in record["probes"] if p["micro_batch"] <= 4)


def test_auto_checkpointing_is_chosen_only_where_the_budget_needs_it():
    model, blocks = _big(), pattern_blocks(64, context=128)
    kept, recomputed = _peak(model, blocks, 16), _peak(model, blocks, 16, "full")
    assert recomputed < kept
    prec = resolve("fp32", CPU)
    for budget, mode in (((kept + recomputed) / 2, "full"), (kept * 1.05, "none")):
        opts = FitOptions(batch_size=16, activation_checkpointing="auto",
                          memory_budget=str(int(budget)))  # fmt: skip
        planned, _ = memory_plan.plan(model, blocks, prec, opts)
        assert (planned.batch_size, planned.activation_checkpointing) == (16, mode)


def test_a_micro_batch_auto_run_trains_as_the_asked_global_batch_does():
    train, val = pattern_blocks(64, context=128), pattern_blocks(16, context=128, seed=1)
    common = dict(precision="fp32", max_steps=20, lr=3e-3, eval_every=20, eval_batches=2,
                  compile=False)  # fmt: skip
    budget = (_peak(_big(), train, 4) + _peak(_big(), train, 8)) / 2
    auto = amptrain.fit(_big(), train, val, batch_size=16, micro_batch="auto",
                        memory_budget=str(int(budget)), **common)  # fmt: skip
    plan = auto.fast_path["memory_plan"]
    assert (plan["micro_batch"], plan["grad_accum"]) == (4, 4)
    assert auto.fast_path["memory_plan"]["asked"] == "16 x 1"
    by_hand = amptrain.fit(
        _big(), train, val, batch_size=4, grad_accum=4, **{**common, "eval_batches": 8}
    )  # the same 32 blocks evaluated

    whole = amptrain.fit(_big(), train, val, batch_size=16, **common)
    assert auto.final_val_loss == by_hand.final_val_loss  # the same split, bit for bit
    assert auto.final_val_loss == pytest.approx(whole.final_val_loss, rel=1e-6)
    train_loss = [r["train/loss"] for r in auto.history if "train/loss" in r]
    assert train_loss == pytest.approx([r["train/loss"] for r in whole.history
                                        if "train/loss" in r], rel=1e-6)  # fmt: skip


def test_on_a_simulated_gpu_an_out_of_memory_step_means_it_does_not_fit(monkeypatch):
    """The CUDA probe catches torch's out-of-memory error; here a fake device raises it."""

    def fake_measure(device, work, timeout=600.0, oom_first=False):
        if fake_measure.micro > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return 100.0, 50.0, "simulated"

    def fake_probe(model, blocks, prec, opts, micro, mode):
        fake_measure.micro = micro
        return real_probe(model, blocks, prec, opts, micro, mode)

    real_probe = memory_plan.probe_step
    monkeypatch.setattr(hardware, "measure_memory", fake_measure)
    monkeypatch.setattr(memory_plan, "probe_step", fake_probe)
    opts = FitOptions(batch_size=8, grad_accum=2, micro_batch="auto", memory_budget="1GiB")
    planned, record = memory_plan.plan(tiny_model(), pattern_blocks(32), resolve("fp32", CPU),
                                       opts)  # fmt: skip
    assert (planned.batch_size, planned.grad_accum) == (2, 8)  # 16 a step, as asked


def test_a_probe_killed_for_memory_is_a_size_that_does_not_fit():
    with pytest.raises(hardware.WorkerKilled, match="died"):
        hardware.measure_memory(CPU, lambda: os.kill(os.getpid(), signal.SIGKILL), oom_first=True)


def test_an_impossible_budget_is_one_line_before_any_run_directory(tmp_path, corpus, capsys):
    out = tmp_path / "runs"
    code = main(["train", "--data", str(corpus), "--layers", "2", "--width", "32", "--heads",
                 "2", "--context", "16", "--batch-size", "4", "--device", "cpu", "--no-progress",
                 "--no-compile", "--micro-batch", "auto", "--memory-budget", "10MiB",
                 "--out", str(out)])  # fmt: skip
    assert code == 2 and not list(out.glob("train-*"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no micro-batch fits the 10.0 MiB memory budget" in err[0]
    assert "raise --memory-budget" in err[0]


def test_the_cli_records_the_split_it_measured_and_resumes_with_it(tmp_path, corpus):
    out = tmp_path / "runs"
    flags = ["--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--device",
             "cpu", "--no-progress", "--no-compile", "--eval-batches", "1"]  # fmt: skip
    assert main(["train", "--data", str(corpus), "--batch-size", "4", "--grad-accum", "2",
                 "--micro-batch", "auto", "--max-steps", "4", "--checkpoint-every", "2",
                 "--eval-every", "2", "--out", str(out), *flags]) == 0  # fmt: skip
    (run,) = out.glob("train-*")
    config = json.loads((run / "config.json").read_text())
    assert config["fit"]["micro_batch"] is None
    assert config["fit"]["batch_size"] * config["fit"]["grad_accum"] == 8  # the asked batch
    plan = config["environment"]["fast_path"]["memory_plan"]
    assert plan["asked"] == "4 x 2" and plan["budget_from"].startswith("the device's memory")
    whole = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").unlink()
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000000004")
    assert main(["train", "--resume", str(run), "--out", str(out), "--no-progress"]) == 0
    assert (run / "model.safetensors").read_bytes() == whole


def test_ranks_agree_on_the_smallest_micro_batch_and_on_checkpointing(monkeypatch):
    from amptrain import distributed

    others = {"values": None}

    def fake_all_reduce(values, op="sum"):  # this rank's values against another rank's
        assert op == "max"
        return [max(a, b) for a, b in zip(values, others["values"])]

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "all_reduce", fake_all_reduce)
    others["values"] = [-2.0, 0.0]  # the other rank fits 2 blocks without checkpointing
    assert memory_plan._agree((4, "none")) == (2, "none")
    others["values"] = [-8.0, 1.0]  # it needed checkpointing
    assert memory_plan._agree((4, "none")) == (4, "full")
    others["values"] = [-0.0, 0.0]  # nothing fitted there
    assert memory_plan._agree((4, "none")) is None


def test_bf16_weights_on_several_processes_are_not_split(monkeypatch):
    """DDP cannot accumulate bf16 gradients in fp32, so the plan keeps the batch whole."""
    from amptrain import distributed

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "all_reduce", lambda values, op="sum": values)
    model, blocks = _big(), pattern_blocks(64, context=128)
    opts = FitOptions(batch_size=16, micro_batch="auto", weights="bf16", memory_budget="1MiB")
    with pytest.raises(ConfigError, match=r"a step of 16 block\(s\)"):
        memory_plan.plan(model, blocks, resolve("bf16", CPU), opts)


def test_a_split_run_resumes_with_the_split_it_measured(tmp_path):
    from amptrain import checkpoint

    train, val = pattern_blocks(64, context=128), pattern_blocks(16, context=128, seed=1)
    budget = str(int((_peak(_big(), train, 4) + _peak(_big(), train, 8)) / 2))
    common = dict(precision="fp32", lr=3e-3, eval_every=3, eval_batches=2, compile=False,
                  batch_size=16, micro_batch="auto", memory_budget=budget)  # fmt: skip
    whole = amptrain.fit(_big(), train, val, max_steps=6, checkpoint_every=3,
                         checkpoint_dir=tmp_path, **common)  # fmt: skip
    ckpt = checkpoint.load(tmp_path / "step-000000003")
    assert ckpt.trainer["batch_size"] == 4  # the micro-batch the plan chose
    resumed = amptrain.fit(_big(), train, val, max_steps=6, resume=ckpt, **common)
    assert "memory_plan" not in resumed.fast_path  # not measured again: the checkpoint's split
    assert resumed.final_val_loss == whole.final_val_loss


def test_no_gradient_of_the_fast_path_timing_reaches_the_first_accumulated_step(monkeypatch):
    from amptrain import low_weights
    from amptrain.callbacks import Callback

    held = []
    accumulate = low_weights.Lowered.accumulate_in_fp32

    def capture(self):
        held.append(self)
        accumulate(self)

    monkeypatch.setattr(low_weights.Lowered, "accumulate_in_fp32", capture)

    class AtStart(Callback):
        def on_fit_start(self, state):
            assert held and not held[0].sums  # the timed passes left nothing behind

    amptrain.fit(tiny_model(), pattern_blocks(32), pattern_blocks(8, seed=1),
                 precision="bf16-true", batch_size=4, grad_accum=2, max_steps=2,
                 attention="auto", compile=False, callbacks=[AtStart()])  # fmt: skip


def test_the_search_space_takes_bf16_weights_and_their_levers():
    from amptrain.config import TrainConfig
    from amptrain.search.space import apply, parse_space, train_command

    space = {"precision": ["bf16", "bf16-true"], "compensation": ["kahan", "sr"],
             "optimizer_state": ["32bit", "8bit"]}  # fmt: skip
    dims = parse_space(space, TrainConfig(), "cpu")
    assert set(dims) == {"precision", "compensation", "optimizer_state"}
    cfg = apply(TrainConfig(), {"precision": "bf16-true", "compensation": "sr",
                                "optimizer_state": "8bit"})  # fmt: skip
    command = train_command(cfg)
    assert "--weights bf16" in command and "--compensation sr" in command
    assert "--optimizer-state 8bit" in command
    with pytest.raises(ConfigError, match="compensation"):
        parse_space({"compensation": ["kahan", "stochastic"]}, TrainConfig(), "cpu")
    plain = apply(cfg, {"precision": "bf16"})  # a bf16-true base: the sampled precision rules
    assert plain.precision == "bf16" and plain.fit.weights == "fp32"


@pytest.mark.parametrize("levers", [{}, {"weights": "bf16", "compensation": "sr"},
                                    {"weights": "bf16", "compensation": "kahan"}])  # fmt: skip
def test_a_probe_run_in_the_process_as_on_cuda_leaves_the_model_as_it_was(monkeypatch, levers):
    """On CUDA the probe's step runs in the run's own process: lr 0, casts and grads undone."""
    from amptrain.bench import state_digest

    def in_process(device, work, timeout=600.0, oom_first=False):  # as measure_memory on CUDA
        work()
        return 100.0, 50.0, "simulated"

    from amptrain import low_weights

    def as_the_run_starts(model):  # bf16 weights: the run rounds the matrices first
        low_weights.cast(model, levers.get("weights", "fp32")).undo()
        return state_digest(model)

    monkeypatch.setattr(hardware, "measure_memory", in_process)
    model = tiny_model(n_layer=2, n_embd=32)
    prec = resolve("bf16" if levers else "fp32", CPU)
    peak = memory_plan.probe_step(model, pattern_blocks(16), prec, FitOptions(**levers), 4, "full")
    assert peak == 100.0 * 2**20
    assert as_the_run_starts(model) == as_the_run_starts(tiny_model(n_layer=2, n_embd=32))
    assert all(p.grad is None and p.dtype == torch.float32 for p in model.parameters())
    if not levers:  # fp32: bit for bit as it was
        assert state_digest(model) == state_digest(tiny_model(n_layer=2, n_embd=32))
