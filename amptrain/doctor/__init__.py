"""AMP diagnosis: which layer overflows fp16, which layer loses precision, and is AMP on at all.

`doctor(model, data)` works on copies of the model, never on the model itself. On real batches
it hooks every module and measures, in fp32, the magnitudes fp16 would have to hold (outputs
and loss-scaled gradients), then runs the same batches under fp16 autocast to name the first
module whose output or gradient becomes inf/NaN. On one batch it compares each AMP precision
with fp32 module by module, feeding every module the fp32 inputs so that each error is that
module's own. One real optimizer step audits dtypes, autocast and the scaler. With `fix=True`
the flagged modules of a copy run in fp32 and the fp16 check is repeated.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import data as data_mod
from amptrain.config import TrainConfig
from amptrain.doctor.audit import Float32, audit, wrap_fp32
from amptrain.doctor.findings import diagnose, verdict
from amptrain.doctor.probe import (
    AMP,
    Measured,
    Setup,
    divergence_rows,
    first_nonfinite,
    headroom_rows,
    measure,
    run_pass,
)
from amptrain.doctor.recorder import Recorder
from amptrain.doctor.records import (
    DoctorReport,
    FixResult,
    LayerHeadroom,
)
from amptrain.doctor.tensors import ROOT, copy_model
from amptrain.errors import ConfigError, ModelError
from amptrain.loop import check_data
from amptrain.precision import Precision, normalize, resolve

__all__ = ["DoctorReport", "Float32", "audit", "check_arms", "doctor", "run_doctor", "wrap_fp32"]

log = logging.getLogger("amptrain")


def _flagged(layers: Sequence[LayerHeadroom], first_forward: str | None, margin: float) -> list:
    """Forward-flagged modules, innermost only (wrapping a child keeps its parent's ops fp32)."""
    names = {r.name for r in layers if r.act_headroom_bits < margin}
    names |= {first_forward} if first_forward else set()
    inner = [n for n in names if not any(o.startswith(f"{n}.") for o in names)]
    if len(inner) > 1 and ROOT in inner:
        inner.remove(ROOT)  # the whole model in fp32 is not a fix but a retreat
    return sorted(inner)


def _fix(
    model: nn.Module, names: list[str], sample: list, setup: Setup, m: Measured
) -> tuple[FixResult, nn.Module | None]:
    """Wrap `names` in a copy of `model`, rerun the fp16 passes, compare with before."""
    before = m.free["fp16"]
    backward_before = before.first_backward if m.finite_losses["fp16"] else None
    if not names:
        same = (before.first_forward, before.first_forward, backward_before, backward_before)
        return FixResult((), m.losses["fp32"], m.losses["fp16"], m.losses["fp16"], *same), None
    fixed = wrap_fp32(copy_model(model), names)
    check, rec = copy_model(fixed).float(), Recorder("free")
    autocast = resolve("fp16", sample[0][0].device).autocast
    losses = [run_pass(check, b, rec, autocast(), setup.loss_scale, setup) for b in sample]
    backward_after = rec.first_backward if all(map(math.isfinite, losses)) else None
    result = FixResult(
        tuple(names),
        m.losses["fp32"],
        m.losses["fp16"],
        losses[0],
        before.first_forward,
        rec.first_forward,
        backward_before,
        backward_after,
    )
    return result, fixed


def check_arms(precisions: Sequence[str] | None, device: torch.device) -> list[str]:
    """The AMP precisions to compare with fp32: the given ones, else all the device serves."""
    if precisions is None:
        served = []
        for name in AMP:
            with contextlib.suppress(ValueError):
                served.append(resolve(name, device).name)
        return served
    names = list(dict.fromkeys(normalize(p) for p in precisions))
    wrong = [n for n in names if n not in AMP]
    if wrong or not names:
        raise ConfigError(
            f"precisions={list(precisions)!r}: the doctor compares the AMP "
            f"precisions {list(AMP)} with fp32; {wrong or 'none given'} is not one"
        )
    for name in names:
        resolve(name, device)  # PrecisionError, with its reason, if the device cannot serve it
    return names


def _check(batches: int, batch_size: int, loss_scale: float, margin_bits: float) -> None:
    for name, value in (("batches", batches), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid: it must be an integer >= 1")
    if not (isinstance(loss_scale, (int, float)) and math.isfinite(loss_scale) and loss_scale > 0):
        raise ConfigError(f"loss_scale={loss_scale!r} is invalid: it must be a finite number > 0")
    if not (isinstance(margin_bits, (int, float)) and 0 <= margin_bits < 16):
        raise ConfigError(f"margin_bits={margin_bits!r} is invalid: it must be in [0, 16)")


def doctor(
    model: nn.Module,
    data: object,
    precisions: Sequence[str] | None = None,
    *,
    precision: str | Precision = "auto",
    batches: int = 2,
    batch_size: int = 8,
    seed: int = 0,
    loss_scale: float = 65536.0,
    margin_bits: float = 2.0,
    fix: bool = False,
    lr: float = 1e-3,
    ignore_index: int = -100,
    source: str = "model",
) -> DoctorReport:
    """Diagnose `model` for mixed precision on real batches of `data`; the model is not changed.

    Args:
        model: Any module mapping token ids `[B, T]` to logits `[B, T, V]` (see `adapter`).
        data: `Blocks`, a 2-D integer tensor, a list of token lists, or a dict with `input_ids`.
        precisions: AMP precisions to compare with fp32 (`fp16`, `bf16`); None: all the
            device serves. The fp16 headroom checks run whatever this says.
        precision: The precision you train with; the audit takes one real step in it.
        batches: Batches measured for headroom (divergence uses the first).
        batch_size: Blocks per batch (capped at the number of blocks).
        seed: Seed of the batch choice and of dropout, identical in every pass.
        loss_scale: The fp16 loss scale gradients are measured at (GradScaler's init_scale).
        margin_bits: Flag modules with less headroom than this, in powers of two.
        fix: Also run the flagged modules of a copy in fp32 and repeat the fp16 check; the
            copy is returned as `report.fixed_model`.
        lr: Learning rate of the audit's optimizer step.
        ignore_index: Label value the loss ignores.
        source: How to name the model in error messages.

    Returns:
        A `DoctorReport`: per-module headroom, the first inf/NaN per precision, the divergence
        ranking, the audit, findings with advice, and the fix's before/after.

    Raises:
        ConfigError, DataError, ModelError, PrecisionError: For bad input, before any pass.

    Example:
        >>> report = doctor(model, blocks)  # doctest: +SKIP
        >>> report.overflowing("forward"), report.ranking("fp16")[0].module  # doctest: +SKIP
    """
    _check(batches, batch_size, loss_scale, margin_bits)
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ModelError(f"{source} has no parameters: there is nothing to train or diagnose")
    device = first.device
    arms = check_arms(precisions, device)
    chosen = resolve(precision, device, init_scale=loss_scale)
    work = copy_model(model).float().train()
    blocks, _ = check_data(work, data, None, device, source, ignore_index)
    size = min(batch_size, len(blocks))
    sample = [(x.to(device), y.to(device)) for x, y in
              itertools.islice(data_mod.batches(blocks, size, seed), batches)]  # fmt: skip
    setup = Setup(seed, ignore_index, float(loss_scale))
    log.info("doctor: %d batch(es) of %d; fp32 against %s; auditing one %s step",
             len(sample), size, ", ".join(arms), chosen.name)  # fmt: skip
    m = measure(work, sample, arms, setup)
    layers, firsts = headroom_rows(m), first_nonfinite(m, setup.loss_scale)
    divergence = divergence_rows(m, arms)
    set_up = audit(model, sample[0], chosen, lr, ignore_index)
    findings = diagnose(layers, firsts, divergence, set_up, margin_bits, setup.loss_scale)
    fixed = result = None
    if fix:
        names = _flagged(layers, m.free["fp16"].first_forward, margin_bits)
        result, fixed = _fix(model, names, sample, setup, m)
        log.info("doctor --fix wrapped %s in a copy of the model", names or "nothing")
    settings = {
        "precision": chosen.name, "precisions": arms, "batches": len(sample),
        "batch_size": size, "context": blocks.context, "seed": seed, "loss_scale": loss_scale,
        "margin_bits": margin_bits, "fix": fix, "source": source,
        "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    from amptrain.runs import environment as train_environment

    environment = {"device": str(device), **train_environment()}
    summary = verdict(layers, findings, setup.loss_scale)
    return DoctorReport(layers, firsts, divergence, set_up, findings, result, summary, settings,
                        environment, fixed)  # fmt: skip


def run_doctor(
    cfg: TrainConfig,
    precisions: Sequence[str] | None = None,
    *,
    batches: int = 2,
    margin_bits: float = 2.0,
    fix: bool = False,
    settings: dict[str, Any] | None = None,
) -> tuple[DoctorReport, Path]:
    """Build model and data from `cfg` like `train`, diagnose, write the run directory.

    `settings` are the command's own options, recorded in `config.json` to rerun it. Returns
    the report and the path of its `report.md`.
    """
    from amptrain.doctor.records import write_report
    from amptrain.run_setup import pick_device, prepare
    from amptrain.runs import create_run_dir, write_config

    check_arms(precisions, pick_device(cfg.device))  # refuse a bad list before loading anything
    model, train, _, precision = prepare(cfg)
    report = doctor(
        model, train, precisions,
        precision=precision, batches=batches, batch_size=cfg.fit.batch_size,
        seed=cfg.fit.seed, loss_scale=cfg.fit.init_scale, margin_bits=margin_bits,
        fix=fix, lr=cfg.fit.lr, ignore_index=cfg.fit.ignore_index, source=cfg.model,
    )  # fmt: skip
    run_dir = create_run_dir(cfg.out, "doctor")
    write_config(run_dir, "doctor", cfg, settings)
    return report, write_report(report, run_dir)
