"""A simulated NVIDIA GPU, so the CUDA-only decisions are tested on a CPU.

The capability probe, `auto`, the benchmark's default arms and the doctor's audit all decide
from the probe's table. On a CUDA device that table comes from timed matmuls; on a simulated
one it comes from a model of the same clock: each kernel costs a fixed launch time, or its FLOPs
over the part's peak in that precision if longer (back-to-back kernels overlap their launches),
and every host synchronisation costs its round trip. A precision the part lacks (bf16 and TF32
before compute capability 8.0) runs at a small fraction of fp32, as cuBLAS's fallback does.

    with capability.simulate(SimulatedGpu.of("T4")):
        precision.resolve("auto", "cuda")  # fp16, decided by the probe as on a real T4

The peaks are the datasheet's (`amptrain.datasheet`) times the fraction of it a large matmul
reaches in practice.
"""

from __future__ import annotations

import dataclasses
import math

from amptrain import datasheet

# The fraction of the datasheet peak a large matmul reaches (an H100's bf16 8192^3 matmul
# measures about 800 of its 989 TFLOP/s; fp32 without tensor cores comes closer to its peak).
EFFICIENCY = {"fp32": 0.9, "tf32": 0.75, "bf16": 0.75, "fp16": 0.75}
# A precision the part has no units for runs at this fraction of its fp32 rate.
FALLBACK_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class SimulatedGpu:
    """A GPU part by its datasheet, with the launch and synchronisation costs of a real one."""

    sheet: datasheet.GpuSheet
    launch_s: float = 6e-6
    sync_s: float = 15e-6

    @classmethod
    def of(cls, name: str, **costs: float) -> SimulatedGpu:
        """The simulated part named as in `datasheet.SHEETS` ("H100 SXM", "A100", "T4", ...)."""
        return cls(datasheet.by_name(name), **costs)

    @property
    def name(self) -> str:
        """The name torch would report, e.g. "NVIDIA H100 SXM (simulated)"."""
        return f"NVIDIA {self.sheet.name} (simulated)"

    @property
    def compute_capability(self) -> tuple[int, int]:
        """The part's (major, minor) compute capability."""
        return self.sheet.compute_capability

    def tflops(self, precision: str) -> float:
        """What a large matmul in `precision` reaches on this part."""
        peak = self.sheet.tflops.get(precision)
        if peak is None:
            return self.sheet.tflops["fp32"] * EFFICIENCY["fp32"] * FALLBACK_FRACTION
        return peak * EFFICIENCY[precision]

    def kernel_s(self, precision: str, shape: tuple[int, int, int]) -> float:
        """One matmul kernel's time: its FLOPs at the part's rate, or the launch if longer."""
        return max(self.launch_s, 2 * math.prod(shape) / (self.tflops(precision) * 1e12))

    def timer(self, precision: str, shape: tuple[int, int, int], repeats: int) -> float:
        """Event-timed back-to-back matmuls, as `matmul_timing.cuda_timer` times them."""
        return repeats * self.kernel_s(precision, shape)

    def synced_timer(self, precision: str, shape: tuple[int, int, int], repeats: int) -> float:
        """Host-timed matmuls with a synchronisation after each (the clock of a naive probe)."""
        return repeats * (self.launch_s + self.sync_s + self.kernel_s(precision, shape))
