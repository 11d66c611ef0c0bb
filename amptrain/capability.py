"""What each precision's matmuls cost on this device, measured once per process.

One short probe per dtype (fp32, bf16, fp16; tf32 on CUDA) times a matmul of the size small
transformers run, and every precision decision reads the same table: `auto`, the warning
before a run in a precision the device only emulates, the benchmark's and the search's
default arms, the doctor's audit and the benchmark's MFU peak. CPU flags (AMX, AVX512-BF16,
AVX512-FP16) and the GPU's compute capability are quoted as hints, never used as the decision:
a flag can be present while the library in use does not exploit it, and the reverse.

How a matmul is timed is `amptrain.matmul_timing`'s job: on a CPU by the CPU time of one
thread, so that a busy machine reads as a quiet one; on CUDA by events around full-size matmuls
after a warm-up; on a simulated GPU (`simulate`) by its model of launch cost and peaks. A probe
whose rounds disagree about a precision is measured again; one that still disagrees says so
(`unreliable`, `undecided`), and the plans keep to what it can tell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import platform
import time
from collections.abc import Iterator
from typing import Any

import torch

from amptrain import matmul_timing
from amptrain.simulated_gpu import SimulatedGpu

# A precision whose matmuls run this many times slower than fp32 counts as emulated here.
EMULATED_SLOWDOWN = 2.0
# `auto` takes a lower precision only when its matmuls beat fp32 by at least this factor.
CLEARLY_FASTER = 1.25
# The probe runs in this many interleaved rounds, so that a load which comes and goes shows
# as a spread between them instead of tilting one precision's figure alone.
ROUNDS = 3
# A probe whose rounds disagree is taken again, up to this many times in all.
ATTEMPTS = 3
# The probe's method: decisions recorded from another method's tables are not kept
# (`decisions.device_key`). 2: CPU time of one thread, CUDA events, no extrapolated scout.
METHOD = 2
_CPU_HINT_FLAGS = ("amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """Measured matmul speed per precision on one device, with the hardware hints beside it."""

    device_type: str
    name: str
    hints: tuple[str, ...]
    tflops: dict[str, float]
    threads: int
    shape: tuple[int, int, int]
    seconds: float
    compute_capability: tuple[int, int] | None = None
    rounds: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    """Each precision's best TFLOP/s in each probe round; `tflops` holds the best of them."""

    @property
    def label(self) -> str:
        """The device with its hints, e.g. "AMD EPYC (avx512_bf16)"."""
        return f"{self.name} ({', '.join(self.hints) or 'no bf16/fp16 flags'})"

    def ratio(self, precision: str) -> float | None:
        """The precision's matmul speed over fp32's; None where it was not probed."""
        speed, ref = self.tflops.get(precision), self.tflops.get("fp32")
        return speed / ref if speed is not None and ref else None

    def emulated(self, precision: str) -> bool:
        """True when the precision's matmuls run `EMULATED_SLOWDOWN` times slower than fp32."""
        ratio = self.ratio(precision)
        return ratio is not None and ratio * EMULATED_SLOWDOWN <= 1.0

    def clearly_faster(self, precision: str) -> bool:
        """True when the precision's matmuls beat fp32's by `CLEARLY_FASTER` or more."""
        ratio = self.ratio(precision)
        return ratio is not None and ratio >= CLEARLY_FASTER

    def ratio_range(self, precision: str) -> tuple[float, float] | None:
        """The lowest and highest speed over fp32's the rounds (and their best) give."""
        ours, ref, best = self.rounds.get(precision), self.rounds.get("fp32"), self.ratio(precision)
        if not ours or not ref or best is None:
            return None
        ratios = [a / b for a, b in zip(ours, ref) if b] + [best]
        return min(ratios), max(ratios)

    def unreliable(self, precision: str) -> str | None:
        """Why the probe cannot tell whether `precision` is clearly faster, or None if it can.

        The rounds disagree when their ratios to fp32 lie on both sides of `CLEARLY_FASTER`:
        then another probe could well decide the other way.
        """
        return self._straddles(precision, CLEARLY_FASTER, "the {:g}x auto asks for")

    def undecided(self, precision: str) -> str | None:
        """Why the probe cannot tell whether `precision` is emulated, or None if it can."""
        return self._straddles(precision, 1 / EMULATED_SLOWDOWN, "the {:g}x below which it is "
                               "emulated")  # fmt: skip

    def _straddles(self, precision: str, threshold: float, what: str) -> str | None:
        span = self.ratio_range(precision)
        if span is None or not span[0] < threshold <= span[1]:
            return None
        return (
            f"its {len(self.rounds[precision])} rounds put {precision} at {span[0]:.2f}x to "
            f"{span[1]:.2f}x fp32's matmul speed, on both sides of {what.format(threshold)} "
            "(the machine is probably busy)"
        )

    def agrees(self) -> bool:
        """True when every round classifies every precision alike (emulated, clearly faster)."""
        return not any(self.unreliable(p) or self.undecided(p) for p in self.tflops)

    def figures(self, precision: str) -> str:
        """E.g. "bf16 0.18 TFLOP/s vs fp32 0.07 on AMD EPYC (avx512_bf16)"."""
        return (
            f"{precision} {_tf(self.tflops.get(precision))} TFLOP/s vs fp32 "
            f"{_tf(self.tflops.get('fp32'))} on {self.label}"
        )

    def slow_warning(self, precision: str) -> str | None:
        """The warning for a requested precision the device only emulates, else None."""
        if precision == "fp32" or not self.emulated(precision):
            return None
        slowdown = 1 / self.ratio(precision)
        faster = [p for p in ("bf16", "tf32") if p != precision and self.clearly_faster(p)]
        choice = faster[0] if faster else "fp32"
        return (
            f"precision {precision!r} is emulated on this device: {self.figures(precision)} "
            f"(matmuls {slowdown:.0f}x slower than fp32), so expect training steps several "
            f"times slower, up to about {slowdown:.0f}x; {choice} is faster here "
            f"(--precision {choice}, or auto)"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, with each precision's ratio to fp32."""
        out = dataclasses.asdict(self)
        out["ratio_vs_fp32"] = {p: self.ratio(p) for p in self.tflops}
        out["emulated"] = [p for p in self.tflops if self.emulated(p)]
        out["unreliable"] = {p: why for p in self.tflops
                             if (why := self.unreliable(p) or self.undecided(p))}  # fmt: skip
        out["method"] = METHOD
        return out


def _tf(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.3g}" if value < 1 else f"{value:.1f}"


_SIMULATED: SimulatedGpu | None = None


def probe(device: str | torch.device = "cpu") -> Capabilities:
    """The device's capability table, measured on first use and cached for the process.

    The cache key includes the thread count, which changes what a CPU matmul achieves.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0 if _SIMULATED else torch.cuda.current_device())
    return _probe_cached(device, torch.get_num_threads(), _SIMULATED)


@functools.cache
def _probe_cached(
    device: torch.device, threads: int, simulated: SimulatedGpu | None
) -> Capabilities:
    return measure(device)


def clear_cache() -> None:
    """Forget the measured tables (the next `probe` measures again)."""
    _probe_cached.cache_clear()


@contextlib.contextmanager
def simulate(gpu: SimulatedGpu) -> Iterator[SimulatedGpu]:
    """Within the block, `cuda` is the simulated `gpu`: probed by its clock, and available.

    For testing the CUDA decisions on a CPU (`amptrain.simulated_gpu`). Not thread-safe.
    """
    global _SIMULATED
    before, _SIMULATED = _SIMULATED, gpu
    try:
        yield gpu
    finally:
        _SIMULATED = before


def cuda_available() -> bool:
    """True when CUDA can be trained on here (or a GPU is simulated)."""
    return _SIMULATED is not None or torch.cuda.is_available()


def device_name(device: torch.device) -> str:
    """The device's name as torch reports it (the simulated GPU's under `simulate`)."""
    if device.type != "cuda":
        return cpu_model() if device.type == "cpu" else device.type
    return _SIMULATED.name if _SIMULATED else torch.cuda.get_device_name(device)


def measure(device: torch.device, budget_s: float = 0.08) -> Capabilities:
    """Measure the table now: per precision, the best matmul rate in each of `ROUNDS` rounds.

    Each round times every precision in turn; the table keeps each precision's best and every
    round's, whose spread says how far to trust it. A probe whose rounds disagree about any
    precision (emulated or not, clearly faster or not) is taken again, up to `ATTEMPTS` times;
    the last one is kept, and says it is unreliable.

    Args:
        device: A CPU or CUDA device (any other type gets an fp32-only table).
        budget_s: Time per precision by the probe's clock, spread over the rounds (an emulated
            dtype may take one matmul's time instead).
    """
    start = time.perf_counter()
    name, hints, cc = _describe(device)
    names = ["fp32", "bf16", "fp16"]
    if device.type == "cuda":  # a part before sm_80 has no bf16 or TF32 units: not probed
        names = ["fp32", "tf32", "bf16", "fp16"] if cc >= (8, 0) else ["fp32", "fp16"]
    elif device.type != "cpu":
        names = ["fp32"]
    shape = (4096, 4096, 4096) if device.type == "cuda" else (256, 256, 256)
    with _timer(device) as timer:
        for _ in range(ATTEMPTS):
            rounds: dict[str, list[float]] = {p: [] for p in names}
            for _ in range(ROUNDS):
                for p in names:
                    rounds[p].append(matmul_timing.rate(timer, p, shape, budget_s / ROUNDS))
            caps = Capabilities(
                device.type, name, hints, {p: max(r) for p, r in rounds.items()},
                torch.get_num_threads(), shape, time.perf_counter() - start, cc,
                {p: tuple(r) for p, r in rounds.items()},
            )  # fmt: skip
            if caps.agrees():
                break
    return caps


def matmul_tflops(
    device: torch.device, precision: str, shape: tuple[int, int, int], budget_s: float
) -> float:
    """TFLOP/s of an `(n, k) @ (k, m)` matmul in the precision's dtype (TF32 on for tf32).

    Timed by the probe's clock for the device (`matmul_timing`) for about `budget_s`.
    """
    with _timer(device) as timer:
        return matmul_timing.rate(timer, precision, shape, budget_s)


@contextlib.contextmanager
def _timer(device: torch.device) -> Iterator[matmul_timing.Timer]:
    if device.type == "cuda" and _SIMULATED is not None:
        yield _SIMULATED.timer
    elif device.type == "cuda":
        with matmul_timing.cuda_timer(device) as timer:
            yield timer
    else:
        with matmul_timing.cpu_timer() as timer:
            yield timer


def _describe(device: torch.device) -> tuple[str, tuple[str, ...], tuple[int, int] | None]:
    if device.type == "cuda":
        major, minor = (_SIMULATED.compute_capability if _SIMULATED
                        else torch.cuda.get_device_capability(device))  # fmt: skip
        return device_name(device), (f"sm_{major}{minor}",), (major, minor)
    if device.type != "cpu":
        return device.type, (), None
    return cpu_model(), cpu_flags(), None


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The CPU's bf16/fp16 matmul flags (AMX, AVX512-BF16, AVX512-FP16; Linux only)."""
    info = _cpuinfo()
    flags = next((line for line in info if line.startswith("flags")), "").split()
    return tuple(flag for flag in _CPU_HINT_FLAGS if flag in flags)


@functools.cache
def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC"."""
    line = next((line for line in _cpuinfo() if line.startswith("model name")), "")
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


def _cpuinfo() -> list[str]:
    if platform.system() != "Linux":
        return []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError:
        return []
