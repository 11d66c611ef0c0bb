"""Call any causal language model and get logits and the next-token loss from whatever it returns.

A model's forward takes token ids `[B, T]` and returns logits `[B, T, V]` in one of four forms,
checked in this order: a `Tensor`; a tuple or list whose first element is a tensor; a mapping
with a `"logits"` key; an object with a `.logits` attribute (Hugging Face `ModelOutput`). The
loss is computed here from the logits, so every model is trained on the same objective.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

import torch
from torch import nn

from amptrain import lora
from amptrain.errors import DataError, ModelError
from amptrain.losses import next_token_cross_entropy

IGNORE_INDEX = -100


def extract_logits(outputs: object) -> torch.Tensor:
    """Return the logits tensor from a model's output.

    Raises:
        ModelError: If no tensor of logits can be found; the message names the type seen.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ModelError(
        f"cannot find logits in a model output of type {type(outputs).__name__}: return a "
        "Tensor [B, T, V], a tuple whose first element is the logits, a dict with a 'logits' "
        "key, or an object with a .logits attribute"
    )


def training_device(model: nn.Module, source: str = "model") -> torch.device:
    """The device of the model's trainable floating-point parameters, where training runs.

    Raises:
        ModelError: If the model has no floating-point parameter that requires a gradient,
            so an optimizer would have nothing to train.
    """
    trainable = [p for p in model.parameters() if p.is_floating_point() and p.requires_grad]
    if not trainable:
        count = sum(1 for _ in model.parameters())
        raise ModelError(
            f"model {source} has no trainable floating-point parameters ({count} parameter "
            "tensor(s), none a float that requires a gradient), so there is nothing to train; "
            "give it learnable layers (nn.Embedding, nn.Linear) or unfreeze them "
            "(requires_grad=True)"
        )
    return trainable[0].device


def forward_logits(
    model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, with_targets: bool | None = None
) -> torch.Tensor:
    """Call `model` on `ids` and return its logits, passing next-token targets when it takes them.

    A forward with a `targets` parameter (nanoGPT, minGPT) returns logits for every position
    only when targets are given, so they are passed by keyword: `targets[:, t]` is the label
    of position t+1, and -1 (their `ignore_index`) where there is none. Its own loss is not
    used: amptrain computes the same loss for every model, so metrics stay comparable.
    `with_targets` gives that answer in advance (a compiled trace cannot call `inspect`).
    """
    if with_targets is None:
        with_targets = takes_targets(type(inner_model(model)))
    if not with_targets:
        return extract_logits(model(ids))
    return extract_logits(model(ids, targets=shifted_targets(labels)))


def inner_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP's wrapper and PEFT's (whose forward passes keywords on)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if lora.is_lora(model) else model


@functools.cache
def takes_targets(model_class: type) -> bool:
    """Whether the class's forward names a `targets` parameter (not merely `**kwargs`)."""
    try:
        return "targets" in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return False


def shifted_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """nanoGPT-style targets: the next label at each position, -1 where none is known."""
    targets = torch.full_like(labels, -1)
    targets[:, :-1] = labels[:, 1:].masked_fill(labels[:, 1:] == ignore_index, -1)
    return targets


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Summed next-token cross-entropy: position t predicts label t+1; `ignore_index` is skipped.

    Divide by `count_targets` for the mean. Summing lets gradient accumulation weight every
    token equally, whatever the padding of each micro-batch. Computed in fp32 by the chunked
    kernel of `amptrain.losses`, which never builds an fp32 copy of the logits.
    """
    return next_token_cross_entropy(logits, labels, ignore_index)


@torch.no_grad()
def next_token_hits(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """How many next-token predictions (argmax) equal their non-ignored label."""
    predicted = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    return ((predicted == targets) & (targets != ignore_index)).sum()


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """The number of positions that `next_token_loss` scores."""
    return int((labels[:, 1:] != ignore_index).sum())


@torch.no_grad()
def probe_vocab(model: nn.Module, context: int, device: torch.device, source: str) -> int:
    """Run one dry-run forward on token 0 and return the vocabulary size V it predicts.

    Token 0 is valid for every vocabulary, so no out-of-range id can reach an embedding
    kernel before the data has been checked against V.

    Raises:
        ModelError: If the forward fails or the output is not floating-point `[1, context, V]`;
            the message names the model source and the shape seen.
    """
    ids = torch.zeros(1, context, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = forward_logits(model, ids, ids)
    except ModelError as exc:
        raise ModelError(f"model {source}: {exc}") from None
    except Exception as exc:  # the user's model: show its error under a short header
        raise ModelError(
            f"model {source} failed on a dry-run batch of shape [1, {context}]: "
            f"{type(exc).__name__}: {exc}. If its context is shorter than {context}, "
            "lower --context"
        ) from exc
    finally:
        model.train(was_training)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, context):
        hint = ""
        if logits.dim() == 3 and logits.shape[1] < context:
            hint = (
                " (fewer positions than given: a forward that returns the last position only "
                "unless given targets, as nanoGPT's does, must name a `targets` parameter, "
                "which amptrain then fills)"
            )
        raise ModelError(
            f"model {source} returned logits of shape {list(logits.shape)} for input "
            f"[1, {context}]; expected [B, T, V] = [1, {context}, vocab_size]{hint}"
        )
    if not logits.is_floating_point():
        raise ModelError(f"model {source} returned logits of dtype {logits.dtype}; need floats")
    return int(logits.shape[-1])


def check_token_range(ids: torch.Tensor, vocab_size: int, what: str, first_row: int = 0) -> None:
    """Refuse token ids outside `[0, vocab_size)` before any kernel sees them.

    `ids` may be a slice of larger data whose row 0 is row `first_row` there.

    Raises:
        DataError: Naming the first bad id, its (row, position) and the vocabulary size.
    """
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        row, pos = (int(i) for i in bad.nonzero()[0])
        raise DataError(
            f"{what} has token id {int(ids[row, pos])} at (row {first_row + row}, position "
            f"{pos}), outside the model's vocabulary [0, {vocab_size}); use a tokenizer that "
            "matches the model, or a model with a larger vocab_size"
        )
