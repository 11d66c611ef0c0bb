"""`compile="auto"`: compile the step only when the run is long enough to repay the compile time.

The decision is made from figures, not guessed from the hardware. One eager forward+backward of
the training shape is timed (after one untimed warm-up pass). The compile time and the share of
the step it saves come from the record a previous run of the same model, shape, precision and
device left in the compile cache; without one, from cautious defaults (`COMPILE_GUESS_S`,
`SAVING_GUESS`, `AUTOCAST_SAVING_GUESS`). The step is compiled when
`steps * eager_step_s * saving >= compile_s`; once compiled, a compiled pass is timed too, and
if it is not faster the run goes back to eager. The figures measured are written back to the
record, so the next run decides on measurements. The decision, its figures and its reason go
to the run's fast-path record.

The records live beside inductor's own FX-graph and AOTAutograd caches (which a second run of
the same model reuses, so its compile is much shorter); `TORCHINDUCTOR_CACHE_DIR` moves both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import distributed
from amptrain.adapter import probe_vocab
from amptrain.compiling import LossFn, compile_loss, eager_loss, time_steps
from amptrain.config import FitOptions
from amptrain.precision import Precision

COMPILE_GUESS_S = 60.0
"""Compile seconds assumed when no run of this model recorded any: a cold cache on a small CPU."""
SAVING_GUESS = 0.10
"""Share of an fp32 step's time a compiled step is assumed to save when none was recorded."""
AUTOCAST_SAVING_GUESS = 0.20
"""The same under autocast (bf16, fp16), where compiling also fuses the casts autocast adds to
every forward: `benchmarks/peers.py` measured 21-22 % on a 2-core AVX512-BF16 CPU."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """Whether to compile, why, and the figures it was decided on."""

    compile: bool
    reason: str
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CompilePlan:
    """The step's loss function (None: eager), the record of the decision, and the clean-up."""

    loss_fn: LossFn | None
    record: dict[str, Any]
    undo: Callable[[], None] = lambda: None
    """Removes the compile-region marks from the model's blocks; call it after training."""


def plan_compile(
    model: nn.Module,
    precision: Precision,
    sample: torch.Tensor,
    attention: Callable[[], contextlib.AbstractContextManager],
    opts: FitOptions,
    steps: int,
    net: nn.Module | None = None,
) -> CompilePlan:
    """Decide (`opts.compile`: True, False or "auto"), compile if so, and time what it takes.

    Compiling happens here, before training, on one batch of the training shape (the loader
    drops a last partial batch, so training reuses the graph); its seconds are reported apart.
    `net` is what the step calls (the DDP wrapper under torch.distributed), so the graph
    compiled here is the one training runs; every rank decides on the slowest rank's times,
    so all ranks decide alike.
    """
    net = net or model
    if opts.compile is False:
        return _plan(None, forced(False))
    key = record_key(model, sample, precision.name, opts.grad_accum)
    decision = forced(True)
    if opts.compile == "auto":
        eager = time_steps(eager_loss(opts.ignore_index), model, precision, sample, attention, 2)
        (eager_s,) = distributed.all_reduce([eager[-1]], "max")
        decision = decide(steps, eager_s * opts.grad_accum, load_record(key),
                          precision.uses_autocast)  # fmt: skip
        if not decision.compile:
            return _plan(None, decision)
    vocab = probe_vocab(model, sample.size(1), sample.device, "model")
    compiled = compile_loss(model, sample, vocab, opts.ignore_index)
    first, then = time_steps(compiled.fn, net, precision, sample, attention, 2)
    first, then = distributed.all_reduce([first, then], "max")
    decision = confirm(decision, first, then * opts.grad_accum)
    if "eager_step_s" in decision.figures:
        save_record(key, decision.figures)
    if not decision.compile:
        compiled.undo()
        return _plan(None, decision)
    return _plan(compiled.fn, decision, compiled.record, compiled.undo)


def _plan(
    loss_fn: LossFn | None,
    decision: Decision,
    extra: dict | None = None,
    undo: Callable[[], None] = lambda: None,
) -> CompilePlan:
    record = {"compiled": decision.compile, "compile_reason": decision.reason,
              **decision.figures, **(extra or {})}  # fmt: skip
    return CompilePlan(loss_fn, record, undo)


def forced(requested: bool) -> Decision:
    """The decision of an explicit `--compile` / `--no-compile`."""
    flag = "--compile / compile=True" if requested else "--no-compile / compile=False"
    return Decision(requested, f"forced by {flag}")


def decide(
    steps: int, eager_step_s: float, recorded: dict[str, Any] | None, autocast: bool = False
) -> Decision:
    """The `auto` decision for a run of `steps` optimizer steps, before compiling anything.

    Args:
        steps: Optimizer steps still to run.
        eager_step_s: Measured seconds of one eager forward+backward pass, times the passes
            per optimizer step (gradient accumulation).
        recorded: What a previous run of the same model left (`compile_s`, `eager_step_s`,
            `compiled_step_s`), or None.
        autocast: The step runs under autocast (the saving assumed without a record is larger).
    """
    figures: dict[str, Any] = {"steps": steps, "eager_step_s": round(eager_step_s, 6)}
    guess = AUTOCAST_SAVING_GUESS if autocast else SAVING_GUESS
    compile_s, saving, source = COMPILE_GUESS_S, guess, "assumed (nothing recorded)"
    if recorded:
        compile_s = float(recorded["compile_s"])
        saving = 1 - float(recorded["compiled_step_s"]) / float(recorded["eager_step_s"])
        source = "recorded by a previous run of this model"
    figures.update(compile_s_estimate=round(compile_s, 3), saving_estimate=round(saving, 4),
                   estimates=source)  # fmt: skip
    if saving <= 0:
        return Decision(False, f"eager: compiled steps measured no faster ({source})", figures)
    repaid = steps * eager_step_s * saving
    figures["saving_s_estimate"] = round(repaid, 3)
    verdict = ">=" if repaid >= compile_s else "<"
    why = (f"{steps} steps x {eager_step_s:.4g} s x {saving:.0%} saved = {repaid:.3g} s "
           f"{verdict} {compile_s:.3g} s to compile ({source})")  # fmt: skip
    if repaid < compile_s:
        return Decision(False, f"eager: {why}", figures)
    return Decision(True, f"compiled: {why}", figures)


def confirm(decision: Decision, compile_s: float, compiled_step_s: float) -> Decision:
    """After compiling: keep the compiled step only if it measured faster than the eager one."""
    figures = {**decision.figures, "compile_s": round(compile_s, 3),
               "compiled_step_s": round(compiled_step_s, 6)}  # fmt: skip
    eager = figures.get("eager_step_s")
    if eager is not None and decision.reason.startswith("compiled") and compiled_step_s >= eager:
        reason = (f"eager: compiled ({compile_s:.3g} s), then measured no faster "
                  f"({compiled_step_s:.4g} s vs {eager:.4g} s eager)")  # fmt: skip
        return Decision(False, reason, figures)
    return Decision(decision.compile, decision.reason, figures)


def record_key(model: torch.nn.Module, sample: torch.Tensor, precision: str, accum: int) -> str:
    """What a record is kept under: the model's class and size, the batch, precision, device."""
    params = sum(p.numel() for p in model.parameters())
    shape = "x".join(str(n) for n in sample.shape)
    return (f"{type(model).__qualname__}|{params}|{shape}x{accum}|{precision}|"
            f"{sample.device.type}|torch{torch.__version__}")  # fmt: skip


def records_path() -> Path:
    """The records file, in inductor's cache folder (`TORCHINDUCTOR_CACHE_DIR` moves it)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "amptrain-compile-records.json"


def load_record(key: str) -> dict[str, Any] | None:
    """The record of a previous run under `key`, or None (missing or unreadable file)."""
    try:
        records = json.loads(records_path().read_text())
    except (OSError, ValueError):
        return None
    found = records.get(key) if isinstance(records, dict) else None
    needed = ("compile_s", "eager_step_s", "compiled_step_s")
    return found if isinstance(found, dict) and all(k in found for k in needed) else None


def save_record(key: str, figures: dict[str, Any]) -> None:
    """Store a run's measured figures under `key` (atomic; a failure only loses the record)."""
    path = records_path()
    try:
        records = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(records, dict):
            records = {}
        names = ("compile_s", "eager_step_s", "compiled_step_s")
        records[key] = {k: figures[k] for k in names}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(records, handle, indent=1)
        os.replace(tmp, path)
    except (OSError, ValueError, KeyError):
        pass  # the record only saves the next run a measurement
