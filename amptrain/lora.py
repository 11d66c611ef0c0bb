"""LoRA adapters through PEFT: a frozen base, small trained matrices, and the precision of each.

`apply` wraps a model with PEFT's `get_peft_model` (`LoraConfig`), on a Hugging Face model and
on a custom `nn.Module` alike:

- **Targets.** By default the linear layers inside the repeated blocks (`blocks.repeated_blocks`:
  attention and MLP projections, `nn.Linear` or transformers' `Conv1D`), never the embedding or
  the output head; where a model has no repeated blocks, every linear layer but the head.
  `targets` (comma-separated names) overrides them, with PEFT's rule: a layer matches when its
  qualified name is, or ends with, one of them.
- **Precision.** The adapters train in fp32 (PEFT's `autocast_adapter_dtype`, checked after
  wrapping) under the run's autocast. The frozen base is stored in the run's autocast dtype
  (bf16, or fp16) where the run computes in it, which halves its memory; with fp32 or tf32
  everything stays fp32. Every frozen parameter is cast, norms and biases too: a model whose
  parameters mix dtypes fails any matmul run outside autocast (the dry run, a user's own
  code). Buffers (RoPE tables) are never cast. `describe` says what was kept
  in which dtype, and the run records it.
- **State.** Only the adapters train, so a checkpoint holds them and their optimizer state
  (`trainable_state`); the base is rebuilt from where it came from on resume.
- **At the end.** `save_adapter` writes the PEFT adapter folder (`adapter_config.json`,
  `adapter_model.safetensors`) that `PeftModel.from_pretrained(base, folder)` loads, and
  `merged` folds the adapters into an fp32 copy of the base (PEFT's `merge_and_unload`), whose
  weights are the run's `model.safetensors` and `hf/`, so `eval`, `generate` and `--init-from`
  take a LoRA run as any other.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain.blocks import repeated_blocks
from amptrain.errors import ConfigError

log = logging.getLogger("amptrain")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What `--lora`, `--lora-alpha`, `--lora-dropout` and `--lora-targets` ask for."""

    rank: int
    alpha: float | None = None  # None: twice the rank
    dropout: float = 0.05
    targets: str | None = None

    @property
    def scale_alpha(self) -> float:
        """The alpha PEFT gets (`alpha / rank` scales the adapters' output)."""
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank


def is_lora(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model (adapters on a frozen base)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def default_targets(model: nn.Module) -> list[str]:
    """The qualified names of the linear layers LoRA adapts by default (see the module doc)."""
    found = repeated_blocks(model)
    if found is not None:
        prefix = f"{found.path}." if found.path else ""
        return [f"{prefix}{i}.{name}" for i, block in enumerate(found.blocks)
                for name, module in block.named_modules() if _linear(module)]  # fmt: skip
    linears = [(name, m) for name, m in model.named_modules() if _linear(m)]
    head = linears[-1][0] if linears else None  # the output head comes last
    return [name for name, _ in linears if name != head]


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def apply(model: nn.Module, settings: LoraSettings, base_dtype: torch.dtype) -> nn.Module:
    """`model` with LoRA adapters on its targets; every other parameter frozen.

    Args:
        model: The model, fp32, on any device.
        settings: Rank, alpha, dropout and targets.
        base_dtype: The dtype the frozen base is stored in (`torch.float32` keeps it).

    Raises:
        ConfigError: For targets that match no layer, or a model PEFT cannot adapt.
    """
    from amptrain._imports import requires

    requires("peft", "lora", "--lora", "leave --lora out for a full fine-tune")
    from peft import LoraConfig, get_peft_model

    targets = _targets(model, settings)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.scale_alpha,
                        lora_dropout=settings.dropout, target_modules=targets,
                        task_type="CAUSAL_LM" if _is_hf(model) else None)  # fmt: skip
    try:
        wrapped = get_peft_model(model, config, autocast_adapter_dtype=True)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--lora cannot adapt this model ({str(exc).splitlines()[0]}); name "
                          "its linear layers with --lora-targets") from None  # fmt: skip
    for name, param in wrapped.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:  # PEFT's promise, checked
            raise ConfigError(f"LoRA parameter {name} is {param.dtype}, not float32")
        if not param.requires_grad and param.is_floating_point() and param.dtype != base_dtype:
            param.data = param.data.to(base_dtype)
    log.info("LoRA: %s", describe(wrapped))
    return wrapped


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


def _targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    if settings.targets is None:
        targets = default_targets(model)
        if not targets:
            raise ConfigError("--lora found no linear layer to adapt in this model; name the "
                              "layers with --lora-targets")  # fmt: skip
        return targets
    wanted = [t.strip() for t in settings.targets.split(",") if t.strip()]
    names = [name for name, m in model.named_modules() if _linear(m)]
    unmatched = [t for t in wanted if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not wanted or unmatched:
        shown = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"--lora-targets {settings.targets!r}: {unmatched or 'nothing'} "
                          "matches no linear layer; this model's are named "
                          f"{shown[:20]}")  # fmt: skip
    return wanted


def describe(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and dtypes of the adapters and the frozen base, for the run's record."""
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    config = next(iter(model.peft_config.values()))  # type: ignore[union-attr]
    return {
        "rank": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
        "targets": sorted(config.target_modules) if config.target_modules else [],
        "trainable_parameters": sum(p.numel() for p in trained),
        "frozen_parameters": sum(p.numel() for p in frozen),
        "adapter_dtype": sorted({str(p.dtype).removeprefix("torch.") for p in trained}),
        "base_dtype": sorted({str(p.dtype).removeprefix("torch.") for p in frozen
                              if p.is_floating_point()}),
    }  # fmt: skip


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict entries of the trainable parameters (the adapters), by their names."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def save_adapter(model: nn.Module, folder: Path) -> None:
    """The PEFT adapter folder `PeftModel.from_pretrained(base, folder)` loads."""
    model.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]


def merged(model: nn.Module) -> nn.Module:
    """The base model with the adapters folded in, in fp32 (`model` is used up).

    The frozen base goes back to fp32 first, so the merged weight is the base as trained plus
    the adapters' product in fp32, not rounded again to bf16.
    """
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    return model.merge_and_unload()  # type: ignore[operator]
