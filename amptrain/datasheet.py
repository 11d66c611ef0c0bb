"""Datasheet figures of the NVIDIA GPUs amptrain's users train on: dense peaks and architecture.

Each entry is matched against `torch.cuda.get_device_name()` by whole words, variant first: an
"NVIDIA H100 PCIe" gets the PCIe part's peaks, not the SXM part's, and "NVIDIA RTX A1000" is not
an "A100". The figures are dense (no 2:4 sparsity) TFLOP/s from NVIDIA's datasheets:
H100/H200 (H100 datasheet, SXM5 / PCIe / NVL columns; H200 datasheet, SXM / NVL), A100 (A100
datasheet, same for SXM4 and PCIe), L40S, L4, A10, T4 and V100 (each part's own datasheet; the
V100's fp16 is its tensor-core figure). Parts before compute capability 8.0 have no bf16 or
TF32 matmuls, so they carry neither.

Used for the MFU beside the measured peak, and as the peaks of the simulated GPUs
(`amptrain.simulated_gpu`) on which the CUDA decisions are tested without a GPU.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True, eq=False)
class GpuSheet:
    """One GPU part: its datasheet name, how to recognise it, its architecture and dense peaks."""

    name: str
    pattern: str
    """A regular expression over the device name, matched case-insensitively by whole words."""
    compute_capability: tuple[int, int]
    tflops: dict[str, float]
    """Dense peak TFLOP/s by precision (fp32, and tf32/bf16/fp16 where the part has them)."""


def _sheet(name: str, pattern: str, cc: tuple[int, int], **tflops: float) -> GpuSheet:
    return GpuSheet(name, pattern, cc, tflops)


# Variants before the plain name: the first match wins.
SHEETS = (
    _sheet("H200 NVL", r"\bH200\b.*\bNVL\b", (9, 0), fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5),
    _sheet("H200 SXM", r"\bH200\b", (9, 0), fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4),
    _sheet("H100 NVL", r"\bH100\b.*\bNVL\b", (9, 0), fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5),
    _sheet("H100 PCIe", r"\bH100\b.*\bPCIe\b", (9, 0), fp32=51.0, tf32=378.0, bf16=756.0,
           fp16=756.0),
    _sheet("H100 SXM", r"\bH100\b", (9, 0), fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4),
    _sheet("A100", r"\bA100\b", (8, 0), fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0),
    _sheet("L40S", r"\bL40S\b", (8, 9), fp32=91.6, tf32=183.0, bf16=362.0, fp16=362.0),
    _sheet("L4", r"\bL4\b", (8, 9), fp32=30.3, tf32=60.0, bf16=121.0, fp16=121.0),
    _sheet("A10", r"\bA10\b", (8, 6), fp32=31.2, tf32=62.5, bf16=125.0, fp16=125.0),
    _sheet("T4", r"\bT4\b", (7, 5), fp32=8.1, fp16=65.0),
    _sheet("V100 PCIe", r"\bV100\b.*\bPCIE\b", (7, 0), fp32=14.0, fp16=112.0),
    _sheet("V100 SXM2", r"\bV100\b", (7, 0), fp32=15.7, fp16=125.0),
)  # fmt: skip


def lookup(device_name: str) -> GpuSheet | None:
    """The datasheet entry for a device name as torch reports it, or None for an unknown part.

    Example:
        >>> lookup("NVIDIA H100 PCIe").name, lookup("NVIDIA RTX A1000")
        ('H100 PCIe', None)
    """
    for sheet in SHEETS:
        if re.search(sheet.pattern, device_name, flags=re.IGNORECASE):
            return sheet
    return None


def by_name(name: str) -> GpuSheet:
    """The entry whose datasheet name is `name` (e.g. "H100 SXM").

    Raises:
        ValueError: For a name not in the table; the message lists the known ones.
    """
    for sheet in SHEETS:
        if sheet.name == name:
            return sheet
    known = ", ".join(s.name for s in SHEETS)
    raise ValueError(f"no datasheet named {name!r}; known GPUs: {known}")
