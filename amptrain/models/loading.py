"""Build the model a run asks for.

The sources are the built-in `tiny-gpt`, a user file `path.py:Name`, an amptrain run directory
(its model with its final weights), or a local Hugging Face causal-LM directory.

A model file is Python that runs with the user's privileges, so it is imported only when named
explicitly, and its resolved path and sha256 are logged first. Nothing found inside a
checkpoint is ever imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from amptrain.errors import ModelError, weights_only_refusal
from amptrain.models import hf_config, trust
from amptrain.models.construct import call_constructor
from amptrain.models.provenance import base_source
from amptrain.models.tiny_gpt import GPTConfig, TinyGPT
from amptrain.models.trained import load_into, run_config
from amptrain.models.user_file import import_symbol

log = logging.getLogger("amptrain")

BUILTIN = "tiny-gpt"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to build: `name` is `tiny-gpt`, `path/to/file.py:Name` or a Hugging Face directory."""

    name: str = BUILTIN
    """The model source."""
    kwargs: dict = dataclasses.field(default_factory=dict)
    """Keyword arguments for the class or factory (for tiny-gpt: GPTConfig fields)."""

    @property
    def kind(self) -> str:
        """`builtin`, `file`, `run` (an amptrain run directory) or `hf`."""
        if self.name == BUILTIN:
            return "builtin"
        path, _, _ = self.name.rpartition(":")
        if path.endswith(".py") or self.name.endswith(".py"):
            return "file"
        if run_config(self.name) is not None:
            return "run"
        if Path(self.name).is_dir():
            return "hf"
        raise ModelError(
            f"--model {self.name!r} is not understood: use 'tiny-gpt', 'path/to/file.py:Name' "
            "(a class or factory in that file), a run directory of amptrain train, or a local "
            "Hugging Face model directory"
        )


def build_model(
    spec: ModelSpec, vocab_size: int, context: int | None = None, named_by: str | None = None
) -> nn.Module:
    """Build the model; `vocab_size` (and `context`, as `block_size`) fill what is not given.

    See `construct.call_constructor` for how a file's class or factory is called.

    Args:
        spec: The model source.
        vocab_size: The tokenizer's vocabulary.
        context: The context, as `block_size`.
        named_by: None when the user named `spec` (a model file is then remembered as
            trusted); else the run directory that named it, whose file must be trusted
            (`check_trusted`).

    Raises:
        ModelError: If the file, symbol or directory cannot give an `nn.Module`, or a run
            directory names a model file that is not trusted.
        FileNotFoundError: If the model file does not exist.
    """
    kind = spec.kind
    if kind == "builtin":
        kwargs = {"vocab_size": vocab_size, **({"block_size": context} if context else {})}
        kwargs.update(spec.kwargs)
        return TinyGPT(GPTConfig(**kwargs))
    if kind == "hf":
        return _load_hf(Path(spec.name))
    if kind == "run":
        return _build_run(spec, vocab_size)
    path, symbol = _split_file_spec(spec.name)
    if named_by is None:
        trust.remember(Path(path))
    else:
        check_trusted(spec.name, named_by)
    factory = import_symbol(Path(path), symbol)
    return call_constructor(factory, spec.name, spec.kwargs, vocab_size, context)


def _build_run(spec: ModelSpec, vocab_size: int) -> nn.Module:
    """The run's architecture (from its `hf/` export, else its base), then its final weights."""
    saved = run_config(spec.name)
    export = Path(spec.name) / "hf"
    if (export / "config.json").is_file() and not spec.kwargs:
        model = _hf_architecture(export)
    else:  # the base's source and the run's own arguments and context
        inner = ModelSpec(base_source(spec.name, saved),
                          {**saved.get("model_kwargs", {}), **spec.kwargs})  # fmt: skip
        model = build_model(inner, vocab_size, saved["context"], named_by=spec.name)
    return load_into(model, spec.name)


def check_trusted(source: str, run_dir: str | Path) -> None:
    """Refuse a model file that the run directory `run_dir` names, unless it is trusted.

    Nothing to check for a model that is not a Python file (weights load without running code).

    Raises:
        ModelError: Naming the file, `--trust-model-code` and `--init-from` (`models.trust`).
    """
    if ModelSpec(source).kind != "file":
        return
    path, _ = _split_file_spec(source)
    trust.check(
        Path(path),
        f"the run directory {run_dir}",
        f"load its weights into a model you name: --model SOURCE --init-from {run_dir}",
    )


def _split_file_spec(name: str) -> tuple[str, str | None]:
    """`file.py:Name` -> (`file.py`, `Name`); `file.py` -> (`file.py`, None)."""
    if name.endswith(".py"):
        return name, None
    path, _, symbol = name.rpartition(":")
    return path, symbol


def _load_hf(path: Path) -> nn.Module:
    from amptrain._imports import requires

    requires("transformers", "hf", f"the Hugging Face model directory {path}")
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json, so it is not a Hugging Face model directory")
    try:
        with quiet_transformers():
            config = hf_config.read_config(path)
            hf_config.check_weight_shapes(path, config)
            model = AutoModelForCausalLM.from_pretrained(path, config=config,
                                                         local_files_only=True)  # fmt: skip
        # transformers 5 loads a checkpoint in its own dtype (bf16, often): amptrain keeps fp32
        # master weights and lowers the compute with autocast, so the weights become fp32.
        return model.float()
    except pickle.UnpicklingError as exc:  # refused by weights_only; never retried unsafely
        weights = sorted(p.name for p in path.glob("*.bin")) or ["its weights"]
        raise ModelError(weights_only_refusal(path / weights[0], exc)) from None
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise ModelError(f"loading the Hugging Face model in {path} failed: {reason}") from None


def _hf_architecture(path: Path) -> nn.Module:
    """The model a Hugging Face config describes, freshly initialised (weights come after)."""
    from amptrain._imports import requires

    requires("transformers", "hf", f"the Hugging Face export {path}")
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_config(hf_config.read_config(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"the Hugging Face export {path} cannot be used: {exc}") from None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Keep transformers' own warnings and progress bars off amptrain's console (errors stay)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
