"""Arm names: a precision (`bf16`), or a precision with LoRA adapters (`bf16+lora`).

A LoRA arm trains adapters on the frozen model; `bench` runs it beside the full fine-tunes
when it is given LoRA settings.

A LoRA arm trains other weights than the full fine-tunes, so it is reported beside them and
never chosen by the verdict, and its model FLOPs utilisation is not computed (its backward
pass skips the frozen weights' gradients, which the FLOP count of a full step includes).
"""

from __future__ import annotations

LORA = "+lora"


def precision_of(arm: str) -> str:
    """The precision an arm trains in."""
    return arm.removesuffix(LORA)


def is_lora(arm: str) -> bool:
    """Whether the arm trains LoRA adapters."""
    return arm.endswith(LORA)


def lowest(precisions: list[str]) -> str:
    """The lowest of the precisions (bf16, then fp16, tf32, fp32): the LoRA arm's."""
    order = ("bf16", "fp16", "tf32", "fp32")
    return min(precisions, key=lambda p: order.index(p) if p in order else len(order))
