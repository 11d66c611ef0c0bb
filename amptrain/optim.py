"""AdamW with weight-decay groups, and the warm-up + cosine schedule counted in optimizer steps."""

from __future__ import annotations

import math

import torch
from torch import nn

from amptrain.config import FitOptions


def make_optimizer(model: nn.Module, opts: FitOptions) -> torch.optim.AdamW:
    """AdamW that decays matrices (dim >= 2) and leaves biases and norm weights alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": opts.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=opts.betas)


def lr_factor(step: int, opts: FitOptions) -> float:
    """The multiplier of the peak lr at optimizer step `step`: linear warm-up, then cosine decay."""
    warmup = opts.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(opts.max_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, opts: FitOptions
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; step it only after a real (not skipped) optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, opts))
