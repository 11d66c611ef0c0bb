"""Refuse a context the model or the memory cannot take, before any forward runs.

Two limits, both cheap to know: the positions a model declares (`block_size`, `n_positions`,
`max_position_embeddings`, on the model or its `.config`), and, for a model that declares its
depth and width, a lower bound on the activation memory of one training micro-batch compared
with the memory available on the device. Without them a context of 100,000 tokens on the
built-in model sits in its first forward for minutes instead of failing.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from amptrain.errors import ConfigError

_POSITION_NAMES = ("block_size", "n_positions", "max_position_embeddings", "max_seq_len")
_DEPTH_NAMES = ("n_layer", "num_hidden_layers", "n_layers")
_WIDTH_NAMES = ("n_embd", "hidden_size", "d_model", "dim")
# Bytes kept for backward per token, layer and unit of width in a GPT-style block (attention
# inputs and outputs, the 4x MLP and its activation, two norms): Korthikanti et al. (2022)
# count 34 with 16-bit activations. 32 keeps the estimate a lower bound in every precision
# (fp32 keeps about twice as much).
_BYTES_PER_TOKEN_WIDTH = 32


def declared_context(model: nn.Module) -> int | None:
    """The longest sequence the model says it takes, or None if it says nothing."""
    return _config_int(model, _POSITION_NAMES)


def activation_bytes(model: nn.Module, batch_size: int, context: int) -> int | None:
    """A lower bound on one micro-batch's training activations, or None if unknown.

    Unknown also when the model recomputes activations in backward (gradient checkpointing).
    """
    # Hugging Face's flag; newer transformers deprecate the older name, so ask for it second.
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), flag) or flag in vars(model):
            if getattr(model, flag):
                return None
            break
    depth = _config_int(model, _DEPTH_NAMES)
    width = _config_int(model, _WIDTH_NAMES)
    if depth is None or width is None:
        return None
    return batch_size * context * depth * width * _BYTES_PER_TOKEN_WIDTH


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: the CUDA allocator's view, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_context(
    model: nn.Module, context: int, batch_size: int, device: torch.device, source: str
) -> None:
    """Refuse `context` if the model declares fewer positions or the memory cannot hold it.

    Raises:
        ConfigError: Naming the context, the limit and what to lower.
    """
    limit = declared_context(model)
    if limit is not None and context > limit:
        raise ConfigError(
            f"context {context} is longer than the {limit} positions model {source} declares; "
            f"lower --context to {limit} or less"
        )
    need = activation_bytes(model, batch_size, context)
    have = available_bytes(device)
    if need is None or have is None or need <= have:
        return
    fits = max(1, context * have // need)
    raise ConfigError(
        f"context {context} with batch size {batch_size} needs at least {need / 2**30:.1f} GiB "
        f"of activations for model {source}, and {device.type} has {have / 2**30:.1f} GiB "
        f"available; lower --context (at most about {fits} could fit at this batch size) or "
        "--batch-size"
    )


def _config_int(model: nn.Module, names: tuple[str, ...]) -> int | None:
    for holder in (model, getattr(model, "config", None)):
        for name in names:
            value = getattr(holder, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None
