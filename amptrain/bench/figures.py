"""The figures derived from an arm's runs: memory, MFU, the comparison with fp32, the targets.

`amptrain.bench.bench` times the arms; these add what the report shows beside the times.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from amptrain import flops, hardware, largest, tf32
from amptrain.bench import arms, ranks
from amptrain.config import FitOptions
from amptrain.data import Blocks
from amptrain.precision import resolve
from amptrain.sizes import parse_size

if TYPE_CHECKING:
    from amptrain.bench import ArmResult

log = logging.getLogger("amptrain")


def free(device: torch.device) -> None:
    """Release what the last run left: Python's garbage and CUDA's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def with_memory(row: ArmResult, device: torch.device, run: Callable[[], object]) -> ArmResult:
    """`row` with the memory `run` (one short run of its arm) needed; a failure is said."""
    if row.status != "ok":
        return row
    try:
        peak, delta, source = ranks.measure_memory(device, run)
    except torch.OutOfMemoryError as exc:
        return dataclasses.replace(row, status="oom", error=f"out of memory: {exc}")
    except Exception as exc:
        log.warning("bench: memory of %s not measured: %s", row.precision, exc)
        return dataclasses.replace(row, mem_source=f"not measured: {exc}")
    finally:
        free(device)
    return dataclasses.replace(row, peak_mem_mb=peak, mem_mb=delta, mem_source=source)


def with_mfu(rows, model, train: Blocks, device, batch_size: int, world_size: int = 1):
    """The rows with their achieved TFLOP/s (per device) and MFU; the FLOPs-per-token record."""
    probe_model = copy.deepcopy(model)
    ids = train.take(slice(2))[0].to(device)
    # per scored position, as the bench's tokens/s counts them (batch x (context - 1))
    flops_per_token, how = flops.train_flops_per_token(probe_model, ids)
    del probe_model
    tokens = batch_size * (train.context - 1)
    out = []
    for row in rows:
        if row.status != "ok" or arms.is_lora(row.precision):  # its FLOPs are not a full step's
            out.append(row)
            continue
        achieved = flops_per_token * row.tokens_per_s / world_size / 1e12  # per device
        peak, source = hardware.peak_tflops(device, arms.autocast_of(row.precision), model,
                                            tokens)  # fmt: skip
        if achieved > peak:  # training outran every probe: the probe under-read, not MFU > 1
            peak, source = achieved, f"training's own rate (the probe read {peak:.3g})"
        sheet = hardware.datasheet_tflops(device, arms.autocast_of(row.precision))
        out.append(dataclasses.replace(
            row, achieved_tflops=achieved, probe_tflops=peak, peak_source=source,
            datasheet_tflops=sheet, mfu_probe=achieved / peak if peak else None,
            mfu_datasheet=achieved / sheet if sheet else None,
        ))  # fmt: skip
    return out, {"flops_per_token": flops_per_token, "flops_counted_how": how}


def compare_to_fp32(rows: Sequence[ArmResult], tol: float) -> list[ArmResult]:
    """The rows with speed, memory and quality relative to fp32's (ok within `tol`)."""
    ref = next((r for r in rows if r.precision == "fp32" and r.status == "ok"), None)
    if ref is None:
        return list(rows)
    out = []
    for row in rows:
        if row.status != "ok" or row is ref:
            out.append(dataclasses.replace(row, quality_ok=True) if row is ref else row)
            continue
        rel = (row.val_loss - ref.val_loss) / ref.val_loss
        mem = None
        if row.mem_mb is not None and ref.mem_mb:
            mem = 1 - row.mem_mb / ref.mem_mb
        out.append(dataclasses.replace(
            row, speedup_vs_fp32=row.tokens_per_s / ref.tokens_per_s,
            mem_reduction_vs_fp32=mem, val_loss_rel_diff=rel,
            val_accuracy_diff=row.val_accuracy - ref.val_accuracy,
            quality_ok=abs(rel) <= tol,
        ))  # fmt: skip
    return out


def targets(rows: Sequence[ArmResult]) -> dict[str, dict[str, Any]]:
    """The original tier-3 targets, measured rather than assumed, for every non-fp32 arm."""
    out = {}
    for r in rows:
        if (r.precision == "fp32" or r.status != "ok" or r.speedup_vs_fp32 is None
                or arms.is_lora(r.precision)):  # fmt: skip
            continue
        mem = r.mem_reduction_vs_fp32
        out[r.precision] = {
            "speedup >= 1.5x": r.speedup_vs_fp32 >= 1.5,
            "memory reduction >= 40%": None if mem is None else mem >= 0.40,
            "|accuracy difference| < 0.01": abs(r.val_accuracy_diff) < 0.01,
        }
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """The conditions of the measurement: versions, device, threads, load."""
    from amptrain.runs import environment

    env = environment()
    env["device"] = str(device)
    env["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    env["tf32"] = tf32.flags()
    env["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return env


def with_largest(
    row: ArmResult, model: nn.Module, train: Blocks, opts: dict[str, Any], budget: str
) -> ArmResult:
    """`row` with the largest batch, and the most blocks at the benchmark's batch, that fit.

    Each measured as a step of the row's arm within `budget` (`amptrain.largest`).
    """
    if row.status != "ok" or arms.is_lora(row.precision):
        return row
    fit_opts = FitOptions(**{k: v for k, v in opts.items() if k != "max_steps"},
                          **arms.options_of(row.precision))  # fmt: skip
    prec = resolve(arms.autocast_of(row.precision), next(model.parameters()).device)
    size = parse_size(budget)
    batch = largest.largest_batch(copy.deepcopy(model), train, prec, fit_opts, size)
    depth = largest.largest_depth(copy.deepcopy(model), train, prec, fit_opts, size,
                                  fit_opts.batch_size)  # fmt: skip
    return dataclasses.replace(row, largest_batch=batch, largest_depth=depth)
