"""The precision benchmark: what each precision buys on the user's own model, measured fairly.

Every arm (fp32, tf32, fp16, bf16) trains a fresh copy of the same initial weights with a fresh
optimizer on the same batch sequence, through the same `fit` loop users train with. Arms are
interleaved over repeats (A B C, A B C, ...) so drift of a shared machine hits all alike;
warm-up steps are excluded; CUDA is synchronised before every clock read. The code checks,
rather than assumes, that each arm started from the same weights and saw the same batches.
Memory is measured per arm in isolation: allocator peaks on CUDA, and on CPU the peak-RSS
increment of a forked worker process. A failing or out-of-memory arm becomes a row saying so.
On several processes (`amptrain bench --nproc N --strategy ddp|fsdp`) every rank trains every
arm; `bench.ranks` says what the figures then mean.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from amptrain import distributed, lora, sharding
from amptrain.bench import arms, figures, ranks
from amptrain.bench import verdict as bench_verdict
from amptrain.bench.clock import StepClock
from amptrain.bench.results import ArmResult, BenchReport
from amptrain.callbacks import Callback
from amptrain.config import FitOptions
from amptrain.data import Blocks, as_blocks
from amptrain.errors import ConfigError
from amptrain.loop import FitResult, check_data, fit
from amptrain.precision import (
    default_plan,
    default_precisions,
    probe_of,
    resolve,
    skip_reason,
)

arm_names = arms.names

__all__ = [
    "ArmResult", "BenchReport", "arm_names", "bench", "check_settings", "default_plan",
    "default_precisions", "skip_reason", "state_digest", "StepClock",
]  # fmt: skip

log = logging.getLogger("amptrain")

LEVER_RECORD = ("weights", "optimizer_impl", "activation_checkpointing")
"""The fields of `fit`'s record an arm reports about its memory levers."""


class _Recorder(Callback):
    """Marks the end of every step (`StepClock`) and checksums every training batch."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device, self.clock = device, StepClock(device)
        self.checksum = torch.zeros((), dtype=torch.float64, device=device)
        self._weights: torch.Tensor | None = None
        self.started = False  # the passes before training (fit's measurements) are not batches
        self._handle = model.register_forward_pre_hook(self._hook)

    def on_fit_start(self, state: Any) -> None:
        self.started = True

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if not self.started or not module.training or not args:
            return
        if not isinstance(args[0], torch.Tensor):
            return
        ids = args[0]
        if self._weights is None or self._weights.shape != ids.shape:
            numel = ids.numel()
            self._weights = torch.arange(1, numel + 1, device=ids.device, dtype=torch.float64)
            self._weights = (self._weights.sqrt() % 1.0).view(ids.shape)
        # On-device, no sync: a position-weighted sum, chained so order matters.
        self.checksum.mul_(1.000001).add_((ids.double() * self._weights).sum())

    def on_step_end(self, state: Any, metrics: Any) -> None:
        self.clock.mark()

    def close(self) -> str:
        self._handle.remove()
        return f"{self.checksum.item():.10e}"


def state_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class _Run:
    """One training run of one arm."""

    step_times: list[float]
    result: FitResult
    init_digest: str
    batch_digest: str


def train_once(
    template: nn.Module,
    train: Blocks,
    val: Blocks,
    arm: str,
    opts: dict[str, Any],
    adapters: lora.LoraSettings | None = None,
) -> _Run:
    model = copy.deepcopy(template)  # fresh weights, equal to the template's
    device = next(model.parameters()).device
    init_digest = state_digest(model)
    precision = arms.autocast_of(arm)  # bf16-true: bf16 autocast, and bf16 weights (levers)
    if arms.is_lora(arm):
        model = lora.apply(model, adapters, resolve(precision, device).dtype)
    recorder = _Recorder(model, device)
    try:
        result = fit(model, train, val, precision=precision, callbacks=[recorder],
                     **{**opts, **arms.options_of(arm)})  # fmt: skip
    finally:
        batch_digest = recorder.close()
    batch_digest = ranks.global_digest(batch_digest)  # every rank's batches, on rank 0
    return _Run(recorder.clock.intervals(), result, init_digest, batch_digest)


def _aggregate(runs: Sequence[_Run], warmup: int, tokens_per_step: int) -> dict[str, Any]:
    timed = [run.step_times[max(warmup - 1, 0) :] for run in runs]
    pooled = sorted(t for times in timed for t in times)
    if not pooled:
        raise ConfigError(f"no timed steps: steps must exceed warmup ({warmup}) by at least 2")
    q1, median, q3 = statistics.quantiles(pooled, n=4) if len(pooled) > 1 else pooled * 3
    per_repeat = [statistics.median(t) for t in timed if t]
    last = runs[-1].result
    scales = [r["amp/loss_scale"] for r in last.history if "amp/loss_scale" in r]
    return {
        "step_ms": median * 1e3,
        "step_ms_iqr": (q1 * 1e3, q3 * 1e3),
        "repeat_ms_range": (min(per_repeat) * 1e3, max(per_repeat) * 1e3),
        "tokens_per_s": tokens_per_step / median,
        "train_loss": last.final_train_loss,
        "val_loss": last.final_val_loss,
        "val_accuracy": last.final_val_accuracy,
        "loss_scale": last.loss_scale,
        "skipped_steps": last.skipped_steps,
        "scale_backoffs": sum(b < a for a, b in zip(scales, scales[1:])),
        "scale_growths": sum(b > a for a, b in zip(scales, scales[1:])),
        "loss_curve": tuple(r["train/loss"] for r in last.history if "train/loss" in r),
        "init_digest": runs[0].init_digest,
        "batch_digest": runs[0].batch_digest,
        "sharding": last.fast_path.get("sharding"),
        "allocator": {k: v for k, v in last.fast_path.items() if k.startswith("allocator")},
        "levers": {k: last.fast_path.get(k) for k in LEVER_RECORD},
    }


def bench(
    model: nn.Module | Callable[[], nn.Module],
    train: object,
    val: object,
    *,
    precisions: Sequence[str] | None = None,
    steps: int = 30,
    warmup: int = 5,
    repeats: int = 3,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    eval_batches: int = 8,
    quality_tol: float = 0.02,
    memory: bool = True,
    compile: bool | str = "auto",
    strategy: str = "ddp",
    source: str = "model",
    adapters: lora.LoraSettings | None = None,
    levers: bool = False,
    memory_budget: str | None = None,
) -> BenchReport:
    """Benchmark precisions side by side on one model and one batch sequence.

    Args:
        model: The model (its current weights are every arm's start; it is not modified) or a
            zero-argument factory, called once under `torch.manual_seed(seed)`.
        train: Training blocks (any form `fit` accepts).
        val: Held-out blocks; every arm is scored on the same `eval_batches` batches of them.
        precisions: Arms to run; default: every precision the device serves. fp32, the
            reference, is always added.
        steps: Optimizer steps per run.
        warmup: The first steps of every run, not timed.
        repeats: Runs per arm, interleaved across arms.
        batch_size: Blocks per batch, the same in every arm (never shrunk on failure).
        lr: Peak learning rate, the same in every arm.
        seed: Seed of the batch order (and of the factory's weights).
        eval_batches: Validation batches for the quality figures.
        quality_tol: An arm's quality is ok when its validation loss is within this relative
            difference of fp32's.
        memory: Measure each arm's memory in isolation (one more short run per arm).
        compile: Compile the arms' steps: True, False, or "auto" (decided per arm from the
            run's length and a measurement, see `amptrain.autocompile`); compilation is
            outside the timing.
        strategy: Under torch.distributed (torchrun), how the processes share each arm's
            model: `ddp` or `fsdp` (see `amptrain.bench.ranks` for what the figures mean
            then); `fsdp` in one process is refused.
        source: How to name the model in error messages.
        adapters: LoRA settings: one more arm trains adapters on the frozen model in the
            lowest precision of the arms (`bf16+lora`, say), beside the full fine-tunes
            (`amptrain.bench.arms`).
        levers: Add the memory levers' arms (`arms.MEMORY_ARMS`): bf16 weights with each
            compensation, 8-bit optimizer state, activation checkpointing.
        memory_budget: A size (`16GiB`): every arm is also asked the largest batch whose
            step fits it, and the memory verdict names the cheapest arm that fits.

    Returns:
        A `BenchReport`; failed arms are rows with `status` "failed" or "oom".
    """
    check_settings(steps, warmup, repeats, quality_tol)
    if memory_budget is not None:
        FitOptions(memory_budget=memory_budget)  # a size that is not one, refused by name
    world_size = distributed.world()[1]
    FitOptions(strategy=strategy)  # an unknown strategy, refused by name
    ranks.check_strategy(strategy, world_size)
    if not isinstance(model, nn.Module):
        torch.manual_seed(seed)
        model = model()
    sharding.check_shardable(model, strategy, source)
    device = next(model.parameters()).device
    names, skipped = arms.names(precisions, device)
    if levers:
        names += [arm for arm in arms.names(list(arms.MEMORY_ARMS), device)[0]
                  if arm not in names]  # fmt: skip
    if adapters is not None:
        names.append(arms.lowest(names) + arms.LORA)
    train_b, val_b = as_blocks(train, name="training data"), as_blocks(val, name="validation data")
    check_data(model, train_b, val_b, device, source, -100)
    # Every step logged: the report's loss curve and loss-scale events are per step.
    opts = dict(max_steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                eval_every=steps, eval_batches=eval_batches, compile=compile,
                strategy=strategy, log_every=1)  # fmt: skip
    runs: dict[str, list[_Run]] = {name: [] for name in names}
    errors: dict[str, tuple[str, str]] = {}
    for repeat in range(repeats):
        for name in names:
            if name in errors:
                continue
            log.info("bench: repeat %d/%d, %s", repeat + 1, repeats, name)
            try:
                runs[name].append(train_once(model, train_b, val_b, name, opts, adapters))
            except torch.OutOfMemoryError as exc:
                errors[name] = ("oom", f"out of memory at batch_size={batch_size}: {exc}")
            except Exception as exc:  # one arm's failure must not stop the others
                errors[name] = ("failed", f"{type(exc).__name__}: {exc}")
            figures.free(device)
    tokens_per_step = batch_size * (train_b.context - 1) * world_size  # every rank's
    why = "timed as asked" if precisions is not None else "timed: not emulated here"
    rows = [_row(name, runs[name], errors.get(name), warmup, tokens_per_step, device, why)
            for name in names]  # fmt: skip
    check_fair(rows)
    if memory:
        mem_opts = {**opts, "max_steps": min(steps, 4), "eval_every": steps}
        rows = [figures.with_memory(row, device,
                                    _memory_run(model, train_b, val_b, row, mem_opts, adapters))
                for row in rows]  # fmt: skip
    rows, flops = figures.with_mfu(rows, model, train_b, device, batch_size, world_size)
    rows = figures.compare_to_fp32(rows, quality_tol)
    if memory_budget is not None:
        rows = [figures.with_largest(row, model, train_b, opts, memory_budget)
                for row in rows]  # fmt: skip
    best, verdict = bench_verdict.verdict(rows, quality_tol)
    memory_verdict = bench_verdict.cheapest(rows, quality_tol, batch_size, memory_budget)
    rows += [ArmResult(name, "skipped", text, error=text) for name, text in skipped.items()]
    settings = dict(precisions=names, steps=steps, warmup=warmup, repeats=repeats,
                    batch_size=batch_size, context=train_b.context, lr=lr, seed=seed,
                    eval_batches=eval_batches, quality_tol=quality_tol, processes=world_size,
                    strategy=strategy, memory_budget=memory_budget, **flops)  # fmt: skip
    caps = probe_of(device)
    return BenchReport(tuple(rows), best, verdict, figures.targets(rows), settings,
                       figures.environment(device), caps.to_dict() if caps else {},
                       memory_verdict)  # fmt: skip


def check_settings(steps: int, warmup: int, repeats: int, quality_tol: float) -> None:
    """Refuse run lengths and a tolerance the benchmark cannot use, before any work.

    Raises:
        ConfigError: Naming the values and the limits.
    """
    if repeats < 1 or warmup < 0 or steps < warmup + 2:
        raise ConfigError(
            f"steps={steps}, warmup={warmup}, repeats={repeats}: need repeats >= 1 and "
            "steps >= warmup + 2 (at least two timed steps)"
        )
    if not 0 < quality_tol < 1:
        raise ConfigError(f"quality_tol={quality_tol} must be in (0, 1)")


def _row(name, runs, error, warmup, tokens_per_step, device, why) -> ArmResult:
    prec = resolve(arms.autocast_of(name), device)
    why = "timed: fp32 is the reference" if name == "fp32" else why
    reason = f"{why}; {prec.warning or prec.reason}"
    if error is not None:
        return ArmResult(name, error[0], reason, error=error[1])
    return ArmResult(name, "ok", reason, **_aggregate(runs, warmup, tokens_per_step))


def check_fair(rows: Sequence[ArmResult]) -> None:
    """Every arm must have started from the same weights and seen the same batches."""
    ok = [r for r in rows if r.status == "ok"]
    for field in ("init_digest", "batch_digest"):
        seen = {r.precision: getattr(r, field) for r in ok}
        if len(set(seen.values())) > 1:
            raise RuntimeError(f"benchmark arms differ in {field}: {seen}; the comparison is void")


def _memory_run(
    model, train, val, row: ArmResult, opts: dict[str, Any], adapters=None
) -> Callable[[], _Run]:
    """One short run of `row`'s arm, for its memory figures."""
    return lambda: train_once(model, train, val, row.precision, opts, adapters)
