"""Settings of a resumed run: the saved config, checked against the command that resumes it.

People resume by running the command they ran before with `--resume` added, so the flags of
that command are accepted when they equal the run's saved settings. A flag that differs is
refused with its saved and its given value, because the checkpoint's optimizer state, data
order and schedule belong to the saved ones. The exceptions: a larger `--max-steps`, which
extends the run (the warm-up and cosine schedule are recomputed for the new total, so the
learning rate at the resume step rises to where the longer schedule has it), and
`--strategy` and `--checkpoint-format`, which say how the processes share the work and write
checkpoints, not what is trained: a run that outgrows DDP continues under FSDP.
"""

from __future__ import annotations

from typing import Any

from amptrain.config import TrainConfig
from amptrain.errors import ConfigError

# Given with --resume, these only say where to look or how to report: never a difference.
# The precision is checked against the checkpoint's instead (`preflight.resolve_precision`): `auto`
# keeps it, and the run's config.json may say `auto` where the checkpoint says `bf16`.
_PLACE = ("out", "precision")
SWITCHABLE = ("fit.max_steps", "fit.strategy", "fit.checkpoint_format", "fit.allocator")
"""Settings a resumed run may change; the checkpoint records the values it was written with."""


def resumed_config(saved: TrainConfig, given: dict[str, Any], step: int) -> TrainConfig:
    """`saved`, with a larger `--max-steps`, `--strategy` and `--checkpoint-format` as given.

    `out` only says where to find the run, so it is never a difference; `precision` is kept
    as saved and checked against the checkpoint's by the caller.

    Args:
        saved: The run's config.json.
        given: The settings of the resuming command (`--config` and flags), nested like
            `TrainConfig.to_dict()`; only what was given explicitly.
        step: The step of the checkpoint being resumed.

    Raises:
        ConfigError: Listing every flag whose value differs from the saved one, or a
            `--max-steps` below the checkpoint's step.
    """
    old = saved.to_dict()
    merged = {**old, **{k: v for k, v in given.items() if k != "fit"}}
    merged["fit"] = {**old["fit"], **given.get("fit", {})}
    new = TrainConfig.from_dict(merged).to_dict()  # normalises types (tuples, aliases of None)
    differences = [
        f"{_flag(name)} (the run has {before!r}, the command gives {after!r})"
        for name, before, after in _diff(old, new)
        if name not in _PLACE and name not in SWITCHABLE
    ]
    if differences:
        raise ConfigError(
            "--resume continues a run with its saved settings, and these differ: "
            f"{'; '.join(differences)}. Give the values the run has, or leave the flags out "
            "(or start a new run without --resume)"
        )
    max_steps, saved_steps = new["fit"]["max_steps"], old["fit"]["max_steps"]
    if max_steps < saved_steps:
        raise ConfigError(
            f"--max-steps {max_steps} is below the run's {saved_steps} (checkpoint at step "
            f"{step}); a resumed run can only be extended: give --max-steps {saved_steps} or more"
        )
    if max_steps != saved_steps:  # the steps now say how long, not the run's --epochs
        new["epochs"] = None
    return TrainConfig.from_dict({**new, **{name: old[name] for name in _PLACE}})


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple]:
    out = []
    for key, before in old.items():
        after = new.get(key)
        if isinstance(before, dict) and isinstance(after, dict) and key == "fit":
            out += _diff(before, after, f"{prefix}{key}.")
        elif before != after:
            out.append((f"{prefix}{key}", before, after))
    return out


def _flag(name: str) -> str:
    field = name.rpartition(".")[2]
    return "--" + field.replace("_", "-")
