"""Build the model a run asks for.

The sources are the built-in `tiny-gpt`, a user file `path.py:Name`, or a local Hugging Face
causal-LM directory.

A model file is Python that runs with the user's privileges, so it is imported only when named
explicitly, and its resolved path and sha256 are logged first. Nothing found inside a
checkpoint is ever imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path

from torch import nn

from amptrain.errors import ModelError
from amptrain.models.tiny_gpt import GPTConfig, TinyGPT

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
        """`builtin`, `file` or `hf`."""
        if self.name == BUILTIN:
            return "builtin"
        path, _, _ = self.name.rpartition(":")
        if path.endswith(".py"):
            return "file"
        if Path(self.name).is_dir():
            return "hf"
        raise ModelError(
            f"--model {self.name!r} is not understood: use 'tiny-gpt', 'path/to/file.py:Name' "
            "(a class or factory in that file) or a local Hugging Face model directory"
        )


def build_model(spec: ModelSpec, vocab_size: int) -> nn.Module:
    """Build the model; `vocab_size` fills a constructor's `vocab_size` argument when not given.

    Raises:
        ModelError: If the file, symbol or directory cannot give an `nn.Module`.
        FileNotFoundError: If the model file does not exist.
    """
    kind = spec.kind
    if kind == "builtin":
        kwargs = {"vocab_size": vocab_size, **spec.kwargs}
        return TinyGPT(GPTConfig(**kwargs))
    if kind == "hf":
        return _load_hf(Path(spec.name))
    path, _, symbol = spec.name.rpartition(":")
    return _call_factory(_import_symbol(Path(path), symbol), spec, vocab_size)


def _import_symbol(path: Path, symbol: str) -> object:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    log.info("importing model file %s (sha256 %s); it runs with your privileges", path, digest)
    module_name = f"amptrain_user_model_{digest[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ModelError(
            f"importing model file {path} failed: {type(exc).__name__}: {exc} "
            "(the traceback above is from that file)"
        ) from exc
    if not hasattr(module, symbol):
        found = sorted(n for n, v in vars(module).items() if _is_model_like(v))
        raise ModelError(
            f"model file {path} has no symbol {symbol!r}; nn.Module classes and functions there: "
            f"{', '.join(found) or 'none'}"
        )
    return getattr(module, symbol)


def _is_model_like(value: object) -> bool:
    is_module_class = inspect.isclass(value) and issubclass(value, nn.Module)
    return is_module_class or (inspect.isfunction(value) and not value.__name__.startswith("_"))


def _call_factory(factory: object, spec: ModelSpec, vocab_size: int) -> nn.Module:
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise ModelError(f"{spec.name} is a {type(factory).__name__}, not a class or function")
    kwargs = dict(spec.kwargs)
    params = inspect.signature(factory).parameters
    if "vocab_size" in params and "vocab_size" not in kwargs:
        kwargs["vocab_size"] = vocab_size
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ModelError(
            f"calling {spec.name} with {sorted(kwargs)} failed: {exc}; "
            "pass its arguments with --model-kwargs '{\"name\": value}'"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec.name} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _load_hf(path: Path) -> nn.Module:
    from amptrain._imports import requires

    requires("transformers", "hf", f"the Hugging Face model directory {path}")
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json, so it is not a Hugging Face model directory")
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"loading the Hugging Face model in {path} failed: {exc}") from exc
