"""`compile="auto"`: compile the step only when the run is long enough to repay the compile time.

The decision is made from figures, not guessed from the hardware, and from medians, not single
steps: one noisy pass must not decide. Eager forward+backward passes of the training shape are
timed after one untimed warm-up: one, and two more unless that one already shows the run too
short to repay any compile; the step's time is their median. The compile time and the share of
the step it saves come from the record previous runs of the same model, shape, precision and
device left in the compile cache (their last `RECORD_RUNS` measurements; the median saving,
the latest compile time); without one, from cautious defaults (`COMPILE_GUESS_S`,
`SAVING_GUESS`, `AUTOCAST_SAVING_GUESS`). The step is compiled when
`steps * eager_step_s * saving >= compile_s`; once compiled (and one more untimed pass: a
compiled step's first passes run slower), `TIMED_PASSES` eager and compiled passes are timed
alternately, so the machine's drift hits both alike, and if the compiled median is not faster
than the eager one the run goes back to eager.
The figures measured are added to the record, so later runs decide on measurements; a record
keeps a model eager only once `VETO_RUNS` of its measurements say so by their median, so one
bad run cannot lock a model out of compiling. The decision, its figures (the timed passes too)
and its reason go to the run's fast-path record.

The records live beside inductor's own FX-graph and AOTAutograd caches (which a second run of
the same model reuses, so its compile is much shorter); `TORCHINDUCTOR_CACHE_DIR` moves both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import distributed
from amptrain.adapter import probe_vocab
from amptrain.cache import read_entries, write_entries
from amptrain.compiling import LossFn, compile_loss, eager_loss, time_steps
from amptrain.config import FitOptions
from amptrain.precision import Precision

COMPILE_GUESS_S = 60.0
"""Compile seconds assumed when no run of this model recorded any: a cold cache on a small CPU."""
SAVING_GUESS = 0.01
"""Share of an fp32 step's time a compiled step is assumed to save when none was recorded:
1 - 1/1.01, the ratio of medians of amptrain compiled against not compiled on `peers.py`'s gpt
job (a 2-core AVX512-BF16 CPU, 5 rounds that disagree: 0.92-1.05), in
benchmarks/results/peers-gpt-amd-epyc-avx512bf16-t2-torch2.13.0-cpu-20261206T212205Z.json."""
AUTOCAST_SAVING_GUESS = 0.05
"""The same under autocast (bf16, fp16), where compiling also fuses the casts autocast adds to
every forward: 1 - 1/1.054 in the same file (bf16; per round 0.98-1.14)."""
TIMED_PASSES = 3
"""Passes timed on each side (after a warm-up) whose median decides; eager stops at one when the
run is too short for compiling to pay even at half that pass's time."""
RECORD_RUNS = 5
"""Measurements a record keeps per model (the latest); their median saving decides."""
VETO_RUNS = 3
"""Measurements a record needs before its median saying "no faster" keeps a model eager."""


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
    eager = eager_loss(opts.ignore_index)
    if opts.compile == "auto":
        decision = measure_eager(
            lambda n: time_steps(eager, model, precision, sample, attention, n),
            steps, opts.grad_accum, precision.uses_autocast,
            # rank 0's record: every rank decides alike
            distributed.broadcast(load_record(key) if distributed.is_main() else None),
        )  # fmt: skip
        if not decision.compile:
            return _plan(None, decision)
    vocab = probe_vocab(model, sample.size(1), sample.device, "model")
    compiled = compile_loss(model, sample, vocab, opts.ignore_index)
    # the compiling pass, then one untimed: a compiled step's first passes run slower
    first, warm = time_steps(compiled.fn, net, precision, sample, attention, 2)
    (first,) = distributed.all_reduce([first], "max")
    times = [warm]
    if "eager_step_s" in decision.figures:  # auto: both again, alternately, so drift hits both
        eager_times, times = alternate(
            lambda: time_steps(eager, model, precision, sample, attention, 1)[0],
            lambda: time_steps(compiled.fn, net, precision, sample, attention, 1)[0],
        )
        decision.figures.update(
            eager_step_s=round(statistics.median(eager_times) * opts.grad_accum, 6),
            eager_passes_s=[round(t, 6) for t in eager_times],
        )
    times = distributed.all_reduce(times, "max")
    decision = confirm(decision, first, statistics.median(times) * opts.grad_accum)
    decision.figures["compiled_passes_s"] = [round(t, 6) for t in times]
    if "eager_step_s" in decision.figures and distributed.is_main():
        save_record(key, decision.figures)
    if not decision.compile:
        compiled.undo()
        return _plan(None, decision)
    return _plan(compiled.fn, decision, compiled.record, compiled.undo)


def alternate(
    eager: Callable[[], float], compiled: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """`TIMED_PASSES` seconds of each pass kind, timed alternately (the slowest rank's)."""
    eager_times, compiled_times = [], []
    for _ in range(TIMED_PASSES):
        eager_times.append(eager())
        compiled_times.append(compiled())
    return distributed.all_reduce(eager_times, "max"), compiled_times


def measure_eager(
    time_passes: Callable[[int], list[float]],
    steps: int,
    accum: int,
    autocast: bool,
    recorded: dict[str, Any] | None,
) -> Decision:
    """Time eager passes (`time_passes(n)`: seconds of n passes) and decide on their median.

    After a warm-up pass one is timed, and `TIMED_PASSES - 1` more unless the run would be too
    short to repay the compile even at half that pass's time. Every rank takes the slowest
    rank's times, so all ranks time as many passes and decide alike.
    """
    times = distributed.all_reduce(time_passes(2)[1:], "max")
    if decide(steps, times[0] / 2 * accum, recorded, autocast).compile:
        times += distributed.all_reduce(time_passes(TIMED_PASSES - 1), "max")
    decision = decide(steps, statistics.median(times) * accum, recorded, autocast)
    decision.figures["eager_passes_s"] = [round(t, 6) for t in times]
    return decision


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
        eager_step_s: Measured seconds of one eager forward+backward pass (a median), times the
            passes per optimizer step (gradient accumulation).
        recorded: What previous runs of the same model left (`load_record`: `compile_s`,
            `saving`, `runs`), or None. A single measurement (`compile_s`, `eager_step_s`,
            `compiled_step_s`) is read as a record of one run.
        autocast: The step runs under autocast (the saving assumed without a record is larger).
    """
    figures: dict[str, Any] = {"steps": steps, "eager_step_s": round(eager_step_s, 6)}
    guess = AUTOCAST_SAVING_GUESS if autocast else SAVING_GUESS
    compile_s, saving, source = COMPILE_GUESS_S, guess, "assumed (nothing recorded)"
    if recorded:
        compile_s, saving = float(recorded["compile_s"]), recorded_saving(recorded)
        runs = int(recorded.get("runs", 1))
        source = f"median of {runs} run(s) recorded for this model"
        figures["record_runs"] = runs
        if saving <= 0 and runs < VETO_RUNS:
            source = (f"{runs} recorded run(s) measured no faster, fewer than {VETO_RUNS}: "
                      f"saving assumed, measured again")  # fmt: skip
            saving = guess
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


def recorded_saving(recorded: dict[str, Any]) -> float:
    """The share of the eager step a record says compiling saves (its median, when it has one)."""
    if "saving" in recorded:
        return float(recorded["saving"])
    return 1 - float(recorded["compiled_step_s"]) / float(recorded["eager_step_s"])


def confirm(decision: Decision, compile_s: float, compiled_step_s: float) -> Decision:
    """After compiling: keep the compiled step only if it measured faster than the eager one.

    Both step times are medians of timed passes (`plan_compile`), so one slow pass cannot undo
    a compile that pays.
    """
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


RECORDS = "amptrain-compile-records.json"


def records_path() -> Path:
    """The records file, in inductor's cache folder (`TORCHINDUCTOR_CACHE_DIR` moves it).

    The compile times it holds depend on that cache, so the two are cleared together.
    """
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / RECORDS


def load_record(key: str) -> dict[str, Any] | None:
    """What previous runs under `key` measured, summarised, or None (none, or unreadable).

    The summary: `saving`, the median share of the eager step the compiled step saved over the
    recorded runs; `compile_s`, the latest run's compile seconds (inductor's cache makes every
    compile after the first one shorter, so the latest says most about the next); `runs`.
    """
    runs = recorded_runs(read_entries(RECORDS, records_path().parent).get(key))
    if not runs:
        return None
    savings = [1 - r["compiled_step_s"] / r["eager_step_s"] for r in runs]
    return {"compile_s": runs[-1]["compile_s"], "saving": statistics.median(savings),
            "runs": len(runs)}  # fmt: skip


def recorded_runs(entry: Any) -> list[dict[str, float]]:
    """The usable measurements of one record entry, oldest first (a bare one: a list of one)."""
    runs = entry.get("runs") if isinstance(entry, dict) and "runs" in entry else [entry]
    names = ("compile_s", "eager_step_s", "compiled_step_s")
    usable = []
    for run in runs if isinstance(runs, list) else []:
        try:
            figures = {k: float(run[k]) for k in names}
        except (TypeError, KeyError, ValueError):
            continue
        if figures["eager_step_s"] > 0:
            usable.append(figures)
    return usable


def save_record(key: str, figures: dict[str, Any]) -> None:
    """Add a run's measured figures to the record under `key`; it keeps the last `RECORD_RUNS`.

    Written atomically (`cache.write_entries`); a failure only loses the record.
    """
    folder = records_path().parent
    records = read_entries(RECORDS, folder)
    names = ("compile_s", "eager_step_s", "compiled_step_s")
    runs = recorded_runs(records.get(key)) + [{k: float(figures[k]) for k in names}]
    records[key] = {"runs": runs[-RECORD_RUNS:]}
    write_entries(RECORDS, records, folder)
