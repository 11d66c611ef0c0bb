"""The capability probe and the decisions read from it, per kind of hardware.

Each kind is a faked probe table with the figures such a machine measures; `auto`, the warning
for an emulated request and the benchmark's default arms must follow the table, not CPU flags.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import pattern_blocks, tiny_model

from amptrain import capability
from amptrain import precision as P
from amptrain.bench import bench, default_plan
from amptrain.capability import Capabilities
from amptrain.loop import fit

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def caps(kind: str, tflops: dict, hints=(), cc=None) -> Capabilities:
    return Capabilities(kind, kind.upper(), tuple(hints), tflops, 1, (256, 256, 256), 0.1, cc)


# kind: (table, auto's choice, precisions that warn, default bench arms)
HARDWARE = {
    "intel-amx": (
        caps("cpu", {"fp32": 1.0, "bf16": 9.0, "fp16": 7.0}, ("amx_bf16", "amx_fp16")),
        "bf16", set(), ["fp32", "fp16", "bf16"],
    ),
    "amd-zen4": (
        caps("cpu", {"fp32": 0.07, "bf16": 0.18, "fp16": 0.001}, ("avx512_bf16",)),
        "bf16", {"fp16"}, ["fp32", "bf16"],
    ),
    "plain-cpu": (
        caps("cpu", {"fp32": 0.05, "bf16": 0.004, "fp16": 0.001}),
        "fp32", {"fp16", "bf16"}, ["fp32"],
    ),
    "cuda-sm70": (
        caps("cuda", {"fp32": 14.0, "tf32": 14.0, "bf16": 1.5, "fp16": 100.0}, ("sm_70",), (7, 0)),
        "fp16", set(), ["fp32", "fp16"],
    ),
    "cuda-sm80": (
        caps("cuda", {"fp32": 19.0, "tf32": 150.0, "bf16": 280.0, "fp16": 280.0}, ("sm_80",),
             (8, 0)),
        "bf16", set(), ["fp32", "tf32", "fp16", "bf16"],
    ),
    "cuda-sm90": (
        caps("cuda", {"fp32": 50.0, "tf32": 400.0, "bf16": 700.0, "fp16": 700.0}, ("sm_90",),
             (9, 0)),
        "bf16", set(), ["fp32", "tf32", "fp16", "bf16"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(HARDWARE))
def test_auto_warnings_and_bench_arms_follow_the_probe(kind):
    table, auto, warns, arms = HARDWARE[kind]
    device = CUDA if table.device_type == "cuda" else CPU
    name, reason = P.auto_choice(table, device)
    assert name == auto
    assert (
        "TFLOP/s" in reason and f"{table.tflops[name if name != 'fp32' else 'bf16']:.3g}" in reason
    )
    planned, skipped = default_plan(table, device)
    assert planned == arms
    assert {p for p in [*planned, *skipped] if table.slow_warning(p)} == warns
    assert set(skipped) == warns
    for name, why in skipped.items():
        assert why.startswith(f"skipped: {name} matmuls run") and f"--precisions {name}" in why


def test_auto_never_takes_fp16_on_a_cpu_even_where_it_is_fastest():
    table = caps("cpu", {"fp32": 1.0, "bf16": 1.1, "fp16": 9.0}, ("amx_fp16",))
    assert P.auto_choice(table, CPU)[0] == "fp32"


def test_cuda_rule_gives_way_when_the_probe_contradicts_it():
    table = caps("cuda", {"fp32": 50.0, "tf32": 50.0, "bf16": 20.0, "fp16": 20.0}, ("sm_90",),
                 (9, 0))  # fmt: skip
    name, reason = P.auto_choice(table, CUDA)
    assert name == "fp32" and "bf16 20" in reason


def test_the_amd_warning_quotes_figures_slowdown_and_the_faster_choice():
    warning = HARDWARE["amd-zen4"][0].slow_warning("fp16")
    assert "fp16 0.001 TFLOP/s vs fp32 0.07 on CPU (avx512_bf16)" in warning
    assert "70x slower" in warning and "bf16 is faster here" in warning


def test_resolve_reads_the_probe_not_the_flags(fake_probe):
    fake_probe(HARDWARE["amd-zen4"][0])
    chosen = P.resolve("auto", "cpu")
    assert chosen.name == "bf16" and "bf16 0.18 TFLOP/s vs fp32 0.07" in chosen.reason
    assert P.resolve("fp16", "cpu").warning is not None
    assert P.resolve("bf16", "cpu").warning is None
    fake_probe(HARDWARE["plain-cpu"][0])
    assert P.resolve("auto", "cpu").name == "fp32"
    assert "emulated" in P.resolve("bf16", "cpu").warning


def test_fit_warns_once_before_the_first_step_and_records_the_figures(fake_probe, caplog):
    fake_probe(HARDWARE["amd-zen4"][0])
    train = pattern_blocks(8)
    with caplog.at_level(logging.WARNING, logger="amptrain"):
        result = fit(tiny_model(n_embd=8, n_head=1), train, None, precision="fp16",
                     max_steps=1, batch_size=2)  # fmt: skip
        fit(tiny_model(n_embd=8, n_head=1), train, None, precision="fp16", max_steps=1,
            batch_size=2)  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "70x slower" in warnings[0]
    assert result.precision_warning == warnings[0]
    assert result.precision_probe["tflops"]["fp16"] == 0.001
    assert result.precision_probe["emulated"] == ["fp16"]


def test_bench_skips_the_emulated_arm_unless_named(fake_probe):
    fake_probe(HARDWARE["amd-zen4"][0])
    quick = dict(steps=3, warmup=1, repeats=1, batch_size=2, eval_batches=1, memory=False)
    model, train, val = tiny_model(n_embd=8, n_head=1), pattern_blocks(8), pattern_blocks(4)
    report = bench(model, train, val, **quick)
    assert [(a.precision, a.status) for a in report.arms] == [
        ("fp32", "ok"), ("bf16", "ok"), ("fp16", "skipped")]  # fmt: skip
    assert "--precisions fp16" in report.arm("fp16").reason
    assert report.arm("bf16").reason.startswith("timed: not emulated here; requested: bf16")
    assert report.probe["tflops"]["fp16"] == 0.001 and report.probe["emulated"] == ["fp16"]
    named = bench(model, train, val, precisions=["fp16"], **quick)
    assert named.arm("fp16").status == "ok"
    assert named.arm("fp16").reason.startswith("timed as asked; precision 'fp16' is emulated")


def test_the_real_probe_is_quick_and_consistent():
    capability.clear_cache()
    table = capability.probe("cpu")
    assert table.seconds < 2.0  # generous: the machine may be shared; the budget is ~0.3 s
    assert set(table.tflops) == {"fp32", "bf16", "fp16"}
    assert all(v > 0 for v in table.tflops.values())
    assert capability.probe("cpu") is table  # cached for the process
    assert table.to_dict()["ratio_vs_fp32"]["fp32"] == 1.0


def test_search_offers_only_precisions_the_probe_finds_not_emulated(fake_probe):
    from amptrain.bench import default_precisions
    from amptrain.search.space import default_space

    fake_probe(HARDWARE["amd-zen4"][0])
    assert default_space(default_precisions(CPU))["precision"] == ["fp32", "bf16"]
    fake_probe(HARDWARE["plain-cpu"][0])
    assert default_space(default_precisions(CPU))["precision"] == ["fp32"]


@pytest.mark.gpu
def test_the_cuda_probe_sees_tensor_cores_and_auto_takes_bf16_from_sm80():
    capability.clear_cache()
    table = capability.probe("cuda")
    assert set(table.tflops) == {"fp32", "tf32", "bf16", "fp16"} and table.seconds < 5.0
    if table.compute_capability >= (8, 0):
        assert table.clearly_faster("bf16") and table.clearly_faster("tf32")
        assert P.resolve("auto", "cuda").name == "bf16"
