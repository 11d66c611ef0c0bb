"""What each precision's matmuls cost on this device, measured once per process.

One short probe per dtype (fp32, bf16, fp16; tf32 on CUDA) times a matmul of the size small
transformers run, and every precision decision reads the same table: `auto`, the warning
before a run in a precision the device only emulates, the benchmark's and the search's
default arms, the doctor's audit and the benchmark's MFU peak. CPU flags (AMX, AVX512-BF16,
AVX512-FP16) and the GPU's compute capability are quoted as hints, never used as the decision:
a flag can be present while the library in use does not exploit it, and the reverse.

The probe takes well under a second in all: on a CPU that emulates fp16 (0.001 TFLOP/s or
less) one 256-wide matmul takes tens to hundreds of milliseconds, so each dtype's probe stops after
its time cap (a single full-size matmul for an emulated dtype), and one so slow that even that
would overrun keeps the figure of its 64-wide scout, which already tells "emulated" apart.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import platform
import time
from typing import Any

import torch

# A precision whose matmuls run this many times slower than fp32 counts as emulated here.
EMULATED_SLOWDOWN = 2.0
# `auto` takes a lower precision only when its matmuls beat fp32 by at least this factor.
CLEARLY_FASTER = 1.25
# The probe runs in this many interleaved rounds, so that a load which comes and goes shows
# as a spread between them instead of tilting one precision's figure alone.
ROUNDS = 3

_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
          "bf16": torch.bfloat16}  # fmt: skip
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
        span = self.ratio_range(precision)
        if span is None or not span[0] < CLEARLY_FASTER <= span[1]:
            return None
        return (
            f"its {len(self.rounds[precision])} rounds put {precision} at {span[0]:.2f}x to "
            f"{span[1]:.2f}x fp32's matmul speed, on both sides of the {CLEARLY_FASTER}x auto "
            "asks for (the machine is probably busy)"
        )

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
        out["unreliable"] = {p: why for p in self.tflops if (why := self.unreliable(p))}
        return out


def _tf(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.3g}" if value < 1 else f"{value:.1f}"


def probe(device: str | torch.device = "cpu") -> Capabilities:
    """The device's capability table, measured on first use and cached for the process.

    The cache key includes the thread count, which changes what a CPU matmul achieves.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _probe_cached(device, torch.get_num_threads())


@functools.cache
def _probe_cached(device: torch.device, threads: int) -> Capabilities:
    return measure(device)


def clear_cache() -> None:
    """Forget the measured tables (the next `probe` measures again)."""
    _probe_cached.cache_clear()


def measure(device: torch.device, budget_s: float = 0.08) -> Capabilities:
    """Measure the table now: per precision, the best of matmuls timed for up to `budget_s`.

    The time is spread over `ROUNDS` rounds, each timing every precision in turn; the table
    keeps each precision's best and every round's, whose spread says how far to trust it.

    Args:
        device: A CPU or CUDA device (any other type gets an fp32-only table).
        budget_s: Time per precision (an emulated dtype may take one matmul's time instead).
    """
    start = time.perf_counter()
    names = ["fp32", "bf16", "fp16"]
    if device.type == "cuda":
        names.insert(1, "tf32")
    elif device.type != "cpu":
        names = ["fp32"]
    n, k, m = (4096, 4096, 4096) if device.type == "cuda" else (256, 256, 256)
    rounds: dict[str, list[float]] = {p: [] for p in names}
    for _ in range(ROUNDS):
        for p in names:
            rounds[p].append(matmul_tflops(device, p, (n, k, m), budget_s / ROUNDS))
    tflops = {p: max(r) for p, r in rounds.items()}
    name, hints, cc = _describe(device)
    return Capabilities(device.type, name, hints, tflops, torch.get_num_threads(), (n, k, m),
                        time.perf_counter() - start, cc,
                        {p: tuple(r) for p, r in rounds.items()})  # fmt: skip


def matmul_tflops(
    device: torch.device, precision: str, shape: tuple[int, int, int], budget_s: float
) -> float:
    """Best TFLOP/s of an `(n, k) @ (k, m)` matmul in the precision's dtype (TF32 on for tf32).

    A 64-wide scout runs first and warms the kernels and threads up. Full-size matmuls are
    then timed until `budget_s` has passed (at least one); only a dtype so slow that one
    full-size matmul would take several budgets keeps the scout's figure instead.
    """
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    try:
        scout = _best_rate(device, precision, tuple(min(d, 64) for d in shape), budget_s / 4)
        too_slow = 2 * math.prod(shape) / (scout * 1e12) > 4 * budget_s
        if too_slow and precision != "fp32":  # fp32 is the reference, never emulated
            return scout
        return _best_rate(device, precision, shape, budget_s)
    finally:
        matmul.fp32_precision = saved


def _best_rate(
    device: torch.device, precision: str, shape: tuple[int, int, int], seconds: float
) -> float:
    """The best TFLOP/s of matmuls timed for `seconds` (at least one, at most 1,000)."""
    n, k, m = shape
    a = torch.randn(n, k, device=device).to(_DTYPE[precision])
    b = torch.randn(k, m, device=device).to(_DTYPE[precision])
    best, deadline = 0.0, time.perf_counter() + seconds
    for _ in range(1000):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n * k * m / (time.perf_counter() - t0) / 1e12)
        if time.perf_counter() > deadline:
            break
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _describe(device: torch.device) -> tuple[str, tuple[str, ...], tuple[int, int] | None]:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return torch.cuda.get_device_name(device), (f"sm_{major}{minor}",), (major, minor)
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
