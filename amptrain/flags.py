"""The one table of training flags, derived from the config dataclasses.

Every `TrainConfig` and `FitOptions` field a user may set from the command line is a flag named
after the field (`fit.max_steps` is `--max-steps`); its type, default and help come from the
field itself and the docstring written under it in `config.py`. The CLI builds its parsers
from this table, and `amptrain search` writes the `amptrain train` command of its best trial
from it, so the two can never disagree.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

from amptrain.config import FitOptions, TrainConfig

# The settable fields, in the order `--help` lists them ("fit." marks FitOptions fields).
FIELDS = (
    "model", "model_kwargs", "init_from", "data", "text_field", "prompt_field",
    "completion_field", "long_examples", "data_dtype", "tokenizer",
    "context", "val_fraction", "val_data", "precision", "device", "out", "epochs", "lora",
    "lora_alpha", "lora_dropout", "lora_targets",
    "fit.max_steps", "fit.batch_size",
    "fit.grad_accum", "fit.lr", "fit.warmup", "fit.weight_decay", "fit.clip_norm",
    "fit.eval_every", "fit.eval_batches", "fit.log_every", "fit.seed", "fit.max_nonfinite",
    "fit.init_scale", "fit.growth_interval", "fit.checkpoint_every", "fit.keep_last",
    "fit.optimizer_impl", "fit.optimizer_state", "fit.weights", "fit.compensation",
    "fit.attention", "fit.loss", "fit.strategy",
    "fit.checkpoint_format", "fit.allocator", "fit.activation_checkpointing",
    "fit.micro_batch", "fit.memory_budget",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag of a config field."""

    flag: str
    field: str
    kind: Callable[[str], Any]
    default: Any
    help: str


def json_object(text: str) -> Any:
    """Parse `--model-kwargs` as JSON, with an error that shows what valid JSON looks like."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not JSON ({exc.msg}); write a JSON object with quoted keys, for "
            'example \'{"n_layer": 2, "n_embd": 64}\''
        ) from None


_KINDS: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "dict": json_object,
    "str | None": str, "float | None": float,
}  # fmt: skip


@functools.cache
def _docstrings(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        doc = getattr(after, "value", None) if isinstance(after, ast.Expr) else None
        if isinstance(node, ast.AnnAssign) and isinstance(getattr(doc, "value", None), str):
            docs[node.target.id] = " ".join(doc.value.split())  # type: ignore[union-attr]
    return docs


def _field(path: str) -> tuple[type, dataclasses.Field]:
    cls, name = (FitOptions, path[4:]) if path.startswith("fit.") else (TrainConfig, path)
    return cls, next(f for f in dataclasses.fields(cls) if f.name == name)


@functools.cache
def train_flags() -> tuple[Flag, ...]:
    """The flags of `amptrain train`, one per entry of `FIELDS`."""
    flags = []
    for path in FIELDS:
        cls, field = _field(path)
        default = field.default
        if default is dataclasses.MISSING:
            default = field.default_factory()  # type: ignore[misc]
        help_text = _docstrings(cls)[field.name]
        if path == "fit.clip_norm":
            help_text += " On the command line 0 disables clipping."
        name = "--" + field.name.replace("_", "-")
        flags.append(Flag(name, path, _KINDS[str(field.type)], default, help_text))
    return tuple(flags)


def value_of(cfg: TrainConfig, path: str) -> Any:
    """The value of a `FIELDS` entry in `cfg`."""
    return getattr(cfg.fit, path[4:]) if path.startswith("fit.") else getattr(cfg, path)
