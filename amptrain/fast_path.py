"""The step's fast path, planned before training: attention backend, compile, loss kernel.

`plan_fast_path` measures or restores each choice, says the result in one line, and returns
the record that `FitResult.fast_path`, config.json and summary.json keep with its reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from amptrain import data as data_mod
from amptrain.attention import AttentionPlan
from amptrain.attention import plan as plan_attention
from amptrain.autocompile import CompilePlan, plan_compile
from amptrain.checkpoint import Checkpoint
from amptrain.compiling import LossFn
from amptrain.config import FitOptions
from amptrain.head_loss import plan_loss
from amptrain.optim import describe
from amptrain.precision import Precision

log = logging.getLogger("amptrain")


def plan_fast_path(
    model: nn.Module,
    net: nn.Module,
    train_b: data_mod.Blocks,
    prec: Precision,
    optimizer: torch.optim.Optimizer,
    opts: FitOptions,
    resume: Checkpoint | None,
    done: int,
) -> tuple[AttentionPlan, CompilePlan, LossFn, dict[str, Any]]:
    """The attention plan, the compile decision, the step's loss function, and their record.

    `done` optimizer steps are behind (a resumed run): the compile decision is for the rest.
    `net` is the module the step calls (`model`, its DDP wrapper or the sharded model). The
    loss is the compiled forward+loss when compiling, else the loss plan's (fused with the
    head, or from the logits).
    """
    attn = _attention(model, train_b, prec, opts, resume)
    sample = train_b.take(slice(opts.batch_size))[0].to(next(model.parameters()).device)
    plan = plan_compile(model, prec, sample, attn.context, opts, opts.max_steps - done, net)
    loss_plan = plan_loss(opts.loss, model, prec, sample, compiled=plan.loss_fn is not None)
    fast_path: dict[str, Any] = {
        **describe(optimizer), "attention": attn.backend, "attention_reason": attn.reason,
        **loss_plan.record(), **plan.record,
    }  # fmt: skip
    _say(fast_path)
    return attn, plan, plan.loss_fn or loss_plan.step_fn(opts.ignore_index), fast_path


_last_said: list[str] = []  # what this process said last (a search says it once)


def reset() -> None:
    """Forget the line said last, so the next run says its fast path even if it is the same."""
    _last_said.clear()


def _say(fast_path: Mapping[str, Any]) -> None:
    """One line naming the step's kernels, when it differs from the last one said.

    The reasons stay in the record (`FitResult.fast_path`, config.json, summary.json).
    """
    compiled = (f"compiled in {fast_path['compile_s']:.1f} s" if fast_path.get("compiled")
                else "not compiled")  # fmt: skip
    line = (
        f"fast path: {fast_path['optimizer']} {fast_path['optimizer_impl']}, attention "
        f"{fast_path['attention']}, {fast_path['loss']} loss, {compiled}"
    )
    if _last_said[-1:] != [line]:
        _last_said[:] = [line]
        log.info("%s", line)


def _attention(
    model: nn.Module,
    train_b: data_mod.Blocks,
    prec: Precision,
    opts: FitOptions,
    resume: Checkpoint | None,
) -> AttentionPlan:
    """Measure the attention backend, or keep the one a resumed run was started with."""
    saved = resume.trainer.get("attention") if resume is not None else None
    if saved is not None and opts.attention == "auto":  # a re-measurement could flip it
        return AttentionPlan(saved, "resumed: the backend this run started with")
    device = next(model.parameters()).device
    sample = train_b.take(slice(opts.batch_size))[0].to(device)
    return plan_attention(opts.attention, model, prec, sample)
