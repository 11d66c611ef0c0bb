"""The CUDA decisions on simulated GPUs, and the probe on a busy CPU.

No test here needs a GPU: the CUDA branch of the probe is driven by `amptrain.simulated_gpu`, a
model of a part's launch cost and datasheet peaks, and `auto`, the benchmark's default arms and
the doctor's audit must then decide as they would on the real part.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from amptrain import capability, datasheet, decisions, matmul_timing, tf32
from amptrain import precision as P
from amptrain.doctor.audit import bf16_speed
from amptrain.errors import PrecisionError
from amptrain.simulated_gpu import SimulatedGpu

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("AMPTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    capability.clear_cache()
    P.reset_warnings()
    yield
    capability.clear_cache()


@pytest.mark.parametrize("part", ["H100 SXM", "A100", "L4"])
def test_auto_takes_bf16_on_ampere_and_newer_with_figures_near_the_datasheet(part):
    gpu = SimulatedGpu.of(part)
    with capability.simulate(gpu):
        caps = capability.probe("cuda")
        for name in ("tf32", "bf16", "fp16"):  # within a factor 2 of the datasheet
            assert 0.5 <= caps.tflops[name] / gpu.sheet.tflops[name] <= 1.0, name
        chosen = P.resolve("auto", "cuda")
        assert chosen.name == "bf16", chosen.reason
        assert f"bf16 {caps.tflops['bf16']:.1f} TFLOP/s" in chosen.reason
        assert chosen.warning is None
        assert P.resolve("bf16", "cuda").warning is None  # not "emulated"
        assert P.default_plan(capability.probe("cuda"), CUDA) == (
            ["fp32", "tf32", "fp16", "bf16"], {})  # fmt: skip
        fast, why, _ = bf16_speed(CUDA)
        assert fast and "bf16 is fast here" in why


def test_a_t4_gets_fp16_with_loss_scaling_and_no_bf16():
    with capability.simulate(SimulatedGpu.of("T4")):
        caps = capability.probe("cuda")
        assert set(caps.tflops) == {"fp32", "fp16"}  # bf16 and TF32 are absent, not emulated
        assert 0.5 <= caps.tflops["fp16"] / 65.0 <= 1.0
        chosen = P.resolve("auto", "cuda")
        assert chosen.name == "fp16" and "has no native bf16" in chosen.reason
        assert P.default_plan(caps, CUDA) == (["fp32", "fp16"], {})
        with pytest.raises(PrecisionError, match="compute capability 8.0"):
            P.resolve("bf16", "cuda")
        fast, why, _ = bf16_speed(CUDA)
        assert not fast and "has no bf16 matmuls" in why and "fp16" in why


def test_launch_cost_is_not_counted_as_matmul_time():
    # A host-synchronised timing of a small matmul is launch and sync: a probe built on it read
    # 0.05 TFLOP/s for bf16 on an H100. The probe's event timing of full-size matmuls does not.
    gpu = SimulatedGpu.of("H100 SXM")
    synced = matmul_timing.rate(gpu.synced_timer, "bf16", (64, 64, 64), 0.01)
    assert synced < 0.1
    assert matmul_timing.rate(gpu.timer, "bf16", (4096,) * 3, 0.01) > 400


def test_a_decision_made_by_another_probe_method_is_not_kept(monkeypatch):
    with capability.simulate(SimulatedGpu.of("H100 SXM")):
        caps = capability.probe("cuda")
        old_key = decisions.device_key(caps).replace(f"probe v{capability.METHOD}", "probe v1")
        decisions.write_entries(decisions.FILE_NAME, {old_key: {"precision": "fp32"}})
        assert P.resolve("auto", "cuda").name == "bf16"
        saved = json.loads((decisions.cache_dir() / decisions.FILE_NAME).read_text())
        assert saved[decisions.device_key(caps)]["precision"] == "bf16"


def test_the_datasheet_matches_whole_names_and_variants():
    names = {
        "NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe",
        "NVIDIA H100 NVL": "H100 NVL", "NVIDIA H200": "H200 SXM", "NVIDIA H200 NVL": "H200 NVL",
        "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A100 80GB PCIe": "A100", "Tesla T4": "T4",
        "NVIDIA L4": "L4", "NVIDIA A10": "A10", "NVIDIA L40S": "L40S",
        "Tesla V100-SXM2-16GB": "V100 SXM2", "Tesla V100-PCIE-32GB": "V100 PCIe",
    }  # fmt: skip
    for device_name, part in names.items():
        assert datasheet.lookup(device_name).name == part, device_name
    for unknown in ("NVIDIA RTX A1000", "NVIDIA GeForce RTX 4090", "NVIDIA L40"):
        assert datasheet.lookup(unknown) is None, unknown
    assert datasheet.lookup("NVIDIA H100 PCIe").tflops["bf16"] < 989.4
    assert "bf16" not in datasheet.lookup("Tesla T4").tflops


@pytest.mark.parametrize("name", P.NAMES)
def test_every_tf32_getter_reads_inside_and_after_every_precision(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU build warns that fp16's scaler has no CUDA
        prec = P.Precision(name, CUDA, "test")
    before = tf32.flags()
    with prec.activate():
        inside = tf32.flags()
        assert not [k for k, v in inside.items() if v.startswith("error")], inside
        assert inside["torch.backends.cuda.matmul.allow_tf32"] == str(name == "tf32")
        assert inside["torch.backends.cudnn.allow_tf32"] == str(name == "tf32")
    assert tf32.flags() == before


def test_the_tf32_switch_restores_a_caller_who_used_the_new_api():
    code = (
        "import torch; from amptrain import tf32\n"
        "B = torch.backends\n"
        "B.fp32_precision = 'tf32'; B.cuda.matmul.fp32_precision = 'tf32'\n"
        "with tf32.matmul_mode(False):\n"
        "    assert torch.get_float32_matmul_precision() == 'highest'\n"
        "    assert B.cudnn.conv.fp32_precision == 'ieee', 'conv would inherit tf32'\n"
        "    assert not [v for v in tf32.flags().values() if v.startswith('error')]\n"
        "assert B.cuda.matmul.fp32_precision == 'tf32'\n"
    )  # a fresh process: torch keeps which API last wrote, for the whole process
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_fast_path_is_planned_inside_the_run_precision(monkeypatch):
    from conftest import pattern_blocks, tiny_model

    from amptrain import loop

    prec = P.resolve("fp32", "cpu")
    active, seen = [], []
    real = prec.activate

    def activate():
        active.append(True)
        return real()

    monkeypatch.setattr(prec, "activate", activate)
    real_plan = loop.plan_fast_path
    monkeypatch.setattr(
        loop, "plan_fast_path", lambda *a, **k: (seen.append(bool(active)), real_plan(*a, **k))[1]
    )
    loop.fit(tiny_model(n_embd=8, n_head=1), pattern_blocks(8), None, precision=prec,
             max_steps=1, batch_size=2)  # fmt: skip
    assert seen == [True]


@pytest.mark.slow
def test_ten_probes_on_a_loaded_cpu_classify_as_a_quiet_probe_does():
    quiet = capability.measure(torch.device("cpu"))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        busy = [capability.measure(torch.device("cpu")) for _ in range(10)]
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    for name in ("bf16", "fp16"):
        expect = (quiet.emulated(name), quiet.clearly_faster(name))
        assert [(c.emulated(name), c.clearly_faster(name)) for c in busy] == [expect] * 10, name
    plans = {tuple(P.default_plan(c, torch.device("cpu"))[0]) for c in busy}
    assert plans == {tuple(P.default_plan(quiet, torch.device("cpu"))[0])}


def test_before_torch_2_9_the_switch_uses_the_legacy_api_alone(monkeypatch):
    monkeypatch.setattr(tf32, "has_new_api", lambda: False)
    with tf32.matmul_mode(True):
        inside = tf32.flags()
    assert inside["torch.get_float32_matmul_precision()"] == "high"
    assert "torch.backends.cuda.matmul.fp32_precision" not in inside
    assert tf32.flags()["torch.get_float32_matmul_precision()"] == "highest"


def test_a_probe_whose_rounds_disagree_is_taken_again(monkeypatch):
    # fp32, bf16, fp16 per round; the first attempt's bf16 straddles auto's 1.25x.
    first = [1.0, 1.1, 0.01, 1.0, 1.5, 0.01, 1.0, 1.2, 0.01]
    second = [1.0, 3.0, 0.01] * 3
    rates = iter(first + second)
    monkeypatch.setattr(matmul_timing, "rate", lambda *args: next(rates))
    caps = capability.measure(torch.device("cpu"))
    assert caps.agrees() and caps.rounds["bf16"] == (3.0, 3.0, 3.0)


def test_a_precision_the_probe_cannot_classify_is_left_out_of_the_default_plan():
    rounds = {"fp32": (1.0, 1.0, 1.0), "bf16": (3.0, 3.0, 3.0), "fp16": (0.9, 0.3, 0.9)}
    caps = capability.Capabilities("cpu", "busy", (), {p: max(r) for p, r in rounds.items()}, 2,
                                   (256,) * 3, 0.1, None, rounds)  # fmt: skip
    assert not caps.emulated("fp16") and caps.undecided("fp16")
    planned, skipped = P.default_plan(caps, torch.device("cpu"))
    assert planned == ["fp32", "bf16"]
    assert "could not tell whether fp16 is emulated" in skipped["fp16"]


@pytest.mark.parametrize("part, name", [("H100 SXM", "bf16-mixed"), ("T4", "16-mixed")])
def test_lightning_gets_the_precision_the_part_serves(part, name):
    pytest.importorskip("lightning")
    from amptrain.integrations.lightning import lightning_precision

    with capability.simulate(SimulatedGpu.of(part)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU build's fp16 scaler has no CUDA
        assert lightning_precision("auto", "cuda")[0] == name
