"""Arm names: a precision (`bf16`), or a precision with levers (`bf16+lora`, `bf16-true+sr+8bit`).

An arm is a precision, `bf16-true` (bf16 autocast with bf16 weights, `low_weights`) included,
followed by `+`-joined levers:

- `lora`: adapters on the frozen model (`bench` adds this arm when given LoRA settings);
- `kahan`, `sr`, `none`: the compensation of a `bf16-true` arm's update;
- `8bit`: AdamW's moments in 8-bit blocks;
- `ckpt`: every repeated block's activations recomputed (activation checkpointing, `full`).

A LoRA arm trains other weights than the full fine-tunes, so it is reported beside them and
never chosen by the verdict, and its model FLOPs utilisation is not computed (its backward
pass skips the frozen weights' gradients, which the FLOP count of a full step includes).
The other levers train the same weights as their precision does, so they are compared with
fp32 like any arm, and the verdict names the cheapest in memory that keeps quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from amptrain.config import BF16_TRUE, FitOptions
from amptrain.errors import ConfigError
from amptrain.precision import default_plan, normalize, probe_of, resolve

LORA = "+lora"
LEVERS: dict[str, dict[str, Any]] = {
    "lora": {},
    "kahan": {"compensation": "kahan"},
    "sr": {"compensation": "sr"},
    "none": {"compensation": "none"},
    "8bit": {"optimizer_state": "8bit"},
    "ckpt": {"activation_checkpointing": "full"},
}
MEMORY_ARMS = ("bf16+ckpt", "bf16+8bit", "bf16-true+kahan", "bf16-true+sr", "bf16-true+sr+8bit")
"""The lever arms `amptrain bench --levers` adds: each lever, and the frugal combination."""


def split(arm: str) -> tuple[str, list[str]]:
    """`(precision, levers)` of an arm name.

    Raises:
        ConfigError: For a lever amptrain does not know, or a compensation without bf16-true.
    """
    precision, *levers = arm.split("+")
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise ConfigError(f"bench arm {arm!r}: unknown lever {unknown[0]!r}; arms are a precision "
                          f"followed by +-joined levers of {', '.join(LEVERS)}, e.g. "
                          "bf16-true+sr+8bit")  # fmt: skip
    compensation = [lever for lever in levers if "compensation" in LEVERS[lever]]
    if compensation and precision.lower() != BF16_TRUE:
        raise ConfigError(f"bench arm {arm!r}: {compensation[0]} is the compensation of bf16 "
                          f"weights; write {BF16_TRUE}+{compensation[0]}")  # fmt: skip
    return precision, levers


def precision_of(arm: str) -> str:
    """The precision an arm trains in, as `fit` takes it (`bf16-true` included)."""
    return split(arm)[0]


def autocast_of(arm: str) -> str:
    """The precision of the arm's matmuls: `bf16` for a `bf16-true` arm, else its precision."""
    precision = precision_of(arm)
    return "bf16" if precision.lower() == BF16_TRUE else precision


def options_of(arm: str) -> dict[str, Any]:
    """The `FitOptions` fields the arm's precision and levers set (bf16 weights included)."""
    bf16_true = precision_of(arm).lower() == BF16_TRUE
    options: dict[str, Any] = {"weights": "bf16"} if bf16_true else {}
    for lever in split(arm)[1]:
        options.update(LEVERS[lever])
    return options


def is_lora(arm: str) -> bool:
    """Whether the arm trains LoRA adapters."""
    return "lora" in split(arm)[1]


def lowest(precisions: list[str]) -> str:
    """The lowest of the precisions (bf16, then fp16, tf32, fp32): the LoRA arm's."""
    order = ("bf16", "fp16", "tf32", "fp32")
    return min(precisions, key=lambda p: order.index(p) if p in order else len(order))


def names(
    precisions: Sequence[str] | None, device: torch.device
) -> tuple[list[str], dict[str, str]]:
    """The arms to run (fp32 first), and the default arms left out with why.

    Raises:
        PrecisionError: A precision the device cannot serve, before any work.
    """
    if precisions is None:
        return default_plan(probe_of(device), device)
    names = []
    for name in ["fp32", *precisions]:
        precision, levers = split(str(name).strip())
        norm = BF16_TRUE if precision.lower() == BF16_TRUE else normalize(precision)
        if norm == "auto":
            norm = resolve("auto", device).name
        arm = "+".join([norm, *levers])
        if arm not in names:
            names.append(arm)
    for name in names:
        check(name, device)  # refuse what cannot run, before any work
    return names, {}


def check(arm: str, device: torch.device) -> None:
    """Refuse an arm the device cannot serve, or whose levers cannot go together."""
    from amptrain.preflight import check_optimizer_state, check_weights

    prec = resolve(autocast_of(arm), device)
    opts = FitOptions(**options_of(arm))
    check_optimizer_state(opts)
    check_weights(opts, prec)
