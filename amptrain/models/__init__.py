"""Models: the built-in tiny GPT, and loaders for user files and local Hugging Face directories."""

from __future__ import annotations

from amptrain.models.loading import ModelSpec, build_model, check_trusted
from amptrain.models.tiny_gpt import GPTConfig, TinyGPT

__all__ = ["GPTConfig", "ModelSpec", "TinyGPT", "build_model", "check_trusted"]
