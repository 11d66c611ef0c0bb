"""The next-token loss computed from the head's input, never building the `[B, T, V]` logits.

A language model's last layer is usually an `nn.Linear` head from the hidden states `[B, T, d]`
to the logits `[B, T, V]`. At a large vocabulary those logits, their fp32 copy, their softmax
and their gradient are the largest tensors of the step. Where the head is found, the loss is
computed from the hidden states and the head's weight by torch's chunked
`F.linear_cross_entropy` (the technique of Liger Kernel's fused linear cross-entropy and
Cut Cross-Entropy): a chunk of rows at a time is projected, scored and differentiated, so only
one chunk of logits ever exists.

The head is found by a dry run before training: forward hooks on every `nn.Linear` record their
outputs, and the head is the one whose output *is* the returned logits, or whose output the
model only casts to another dtype (a `.float()` at the end: the loss computes in fp32 anyway,
so the cast changes nothing). A model that post-processes its logits (scaling, soft-capping,
slicing), calls its head more than once, or computes its own loss from the logits (a forward
with a `targets` parameter) keeps the unfused loss, and the plan says why.

During the step the head's forward is replaced, for that one call, by one that keeps its input
and returns a zero-stride placeholder, so the model's code runs unchanged up to the head.
Evaluation needs the logits for the accuracy, so it always runs the model unfused (under
`no_grad` the logits are its only large tensor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from amptrain.adapter import forward_logits, inner_model, next_token_loss, takes_targets
from amptrain.errors import ModelError
from amptrain.precision import Precision

HAS_FUSED_OP = hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions")
"""torch's chunked linear cross-entropy came with torch 2.13; before it, the loss is unfused."""

FUSE_ABOVE_BYTES = 128 * 2**20
"""`auto` fuses when one micro-batch's fp32 logits exceed this (128 MiB: two chunks or more).
Measured (benchmarks/loss_memory.py, 1,024 rows of width 256, fp32): at V = 50,257 (206 MB of
logits) the fused loss adds 181 MB where the unfused one adds 427, and was no slower; at
V = 8,192 (34 MB) one chunk holds all the logits, so fusing saves little and was slower."""

CHUNK_BYTES = 64 * 2**20
"""fp32 logits per chunk of the fused loss (64 MiB)."""

MIN_CHUNK_ROWS = 128
"""Every chunk re-reads the whole head weight, so a chunk has at least this many rows: fewer
make the weight-gradient product memory-bound and the loss several times slower."""


@dataclasses.dataclass(frozen=True)
class LossPlan:
    """How the step computes its loss, and why."""

    kind: str
    """`fused` (from the head's input, in chunks) or `unfused` (from the model's logits)."""
    reason: str
    head: nn.Linear | None = dataclasses.field(default=None, repr=False, compare=False)

    def forward_loss(
        self, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, ignore_index: int
    ) -> torch.Tensor:
        """Run `model` on `ids` and return the summed next-token loss (fp32 scalar)."""
        if self.head is None:
            return next_token_loss(forward_logits(model, ids, labels), labels, ignore_index)
        with _capture_input(self.head) as captured:
            returned = forward_logits(model, ids, labels)
        if returned is not captured["placeholder"]:  # the dry run checked it; the shapes differ
            raise ModelError(
                "the model post-processed its head's output in training, which the dry run "
                "did not show; train it with loss='unfused' (--loss unfused)"
            )
        return fused_next_token_loss(captured["hidden"], self.head, labels, ignore_index)

    def step_fn(self, ignore_index: int) -> Callable[..., torch.Tensor]:
        """This plan as the step's `loss_fn(model, ids, labels)` (see `step.train_step`)."""
        return functools.partial(self.forward_loss, ignore_index=ignore_index)

    def record(self) -> dict[str, str]:
        """The fast-path record's entries for the loss."""
        return {"loss": self.kind, "loss_reason": self.reason}


UNFUSED = LossPlan("unfused", "chunked fp32 cross-entropy on the model's logits (amptrain.losses)")


def fused_next_token_loss(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Summed next-token cross-entropy of `head(hidden)` without building the logits.

    Equal to `next_token_loss(head(hidden), labels)` within the rounding of the precision, with
    gradients for `hidden`, the head's weight and its bias. Under autocast on CUDA the
    projection runs in the autocast dtype with fp32 accumulation (torch's "compact" policy), at
    the tensor cores' rate, as `head(hidden)` runs it. Elsewhere (the CPU, whose chunked op
    emulates low-precision matmuls, or fp32) the inputs are rounded to the autocast dtype, as
    `head(hidden)` rounds them, and projected in fp32: products of bf16/fp16 numbers are exact
    in fp32, and torch's op returns its loss in the dtype of its inputs.
    """
    device = hidden.device.type
    low = native_low_dtype(hidden.device)
    rows, width = hidden.shape[0] * hidden.shape[1], hidden.shape[-1]
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]  # the shift folded into the targets: no copy of `hidden`
    vocab = head.weight.shape[0]
    chunk = min(rows, max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab)))
    if low is None:
        hidden, weight, bias = _projection_inputs(hidden, head)
        options = nn.LinearCrossEntropyOptions(
            batch_chunk_size=chunk, chunking_method=None, acc_policy="accurate"
        )
        with torch.autocast(device, enabled=False):  # the dtypes are chosen here, explicitly
            return F.linear_cross_entropy(
                hidden.reshape(rows, width), weight, targets.reshape(rows), linear_bias=bias,
                reduction="sum", ignore_index=ignore_index, options=options,
            )  # fmt: skip
    return _low_precision_loss(hidden.reshape(rows, width), head, targets.reshape(rows),
                               ignore_index, low, chunk)  # fmt: skip


def native_low_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype the fused projection runs in: autocast's on CUDA, else None (fp32)."""
    if device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return None
    return torch.get_autocast_dtype("cuda")


def _low_precision_loss(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, ignore_index: int,
    low: torch.dtype, chunk: int,
) -> torch.Tensor:  # fmt: skip
    """The summed loss with the projection in `low` and fp32 accumulation (CUDA).

    torch returns the loss in `low`. bf16 has fp32's range: the mean is taken and multiplied
    back by the number of scored targets, in fp32 (a micro-batch with no target scored gets one
    fake target whose loss is multiplied by zero: the mean of none is 0/0, whose gradient is
    NaN). In fp16 a scalar would overflow both ways: a sum of thousands of rows as a value, and
    a mean as a gradient (the loss scale, 65,536 at first, reaches it whole). So fp16 returns a
    loss per row, summed in fp32, whose gradients are the loss scale over the tokens (torch's
    op then recomputes each chunk's logits in the backward pass). No value is read on the host.
    """
    bias = None if head.bias is None else head.bias.to(low)
    options = nn.LinearCrossEntropyOptions(
        batch_chunk_size=chunk, chunking_method=None, acc_policy="compact",
        acc_dtype=torch.float32,
    )  # fmt: skip
    counted = (targets != ignore_index).sum()
    if low == torch.bfloat16:
        targets = targets.clone()
        fake = 1 if ignore_index == 0 else 0  # any class but the ignored one
        targets[-1] = torch.where(counted == 0, fake, targets[-1])  # the last: never scored
    with torch.autocast("cuda", enabled=False):  # the dtypes are chosen here, explicitly
        out = F.linear_cross_entropy(
            hidden.to(low), head.weight.to(low), targets, linear_bias=bias,
            reduction="mean" if low == torch.bfloat16 else "none",
            ignore_index=ignore_index, options=options,
        )  # fmt: skip
    return out.float() * counted if low == torch.bfloat16 else out.float().sum()


def _projection_inputs(
    hidden: torch.Tensor, head: nn.Linear
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hidden states, weight and bias rounded as `head(hidden)` rounds them, held in fp32+."""
    device = hidden.device.type
    low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    tensors = [hidden, head.weight] + ([] if head.bias is None else [head.bias])
    if low is not None:
        tensors = [t.to(low) for t in tensors]
    wide = torch.promote_types(torch.promote_types(hidden.dtype, head.weight.dtype), torch.float32)
    tensors = [t.to(wide) for t in tensors]
    return tensors[0], tensors[1], tensors[2] if head.bias is not None else None


@contextlib.contextmanager
def _capture_input(head: nn.Linear) -> Iterator[dict[str, torch.Tensor]]:
    """For one forward, `head` keeps its input and returns a zero-stride fp32 placeholder."""
    captured: dict[str, torch.Tensor] = {}

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        captured["hidden"] = hidden
        shape = (*hidden.shape[:-1], head.out_features)
        # fp32, so a model's final `.float()` returns the placeholder itself.
        captured["placeholder"] = hidden.new_zeros((), dtype=torch.float32).expand(shape)
        return captured["placeholder"]

    head.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield captured
    finally:
        del head.forward


def plan_loss(
    choice: str,
    model: nn.Module,
    precision: Precision,
    sample: torch.Tensor,
    compiled: bool = False,
) -> LossPlan:
    """Decide how the step computes the loss, by a dry run of `model` on `sample` `[B, T]`.

    `auto` fuses where the head is found and one micro-batch's fp32 logits exceed
    `FUSE_ABOVE_BYTES`; `fused` wherever the head is found; `unfused` never. A model whose head
    cannot be fused keeps the unfused loss under `auto` and `fused` alike, with the reason. A
    compiled model keeps it too: swapping the head's forward in each step would recompile it.
    """
    if choice == "unfused":
        return dataclasses.replace(UNFUSED, reason="asked for (loss='unfused')")
    if not HAS_FUSED_OP:
        return dataclasses.replace(
            UNFUSED, reason=f"torch {torch.__version__} has no F.linear_cross_entropy (it came "
            f"with torch 2.13); {UNFUSED.reason}",
        )  # fmt: skip
    if compiled:
        return dataclasses.replace(UNFUSED, reason=f"the model is compiled; {UNFUSED.reason}")
    head, why_not = find_head(model, precision, sample)
    if head is None:
        return dataclasses.replace(UNFUSED, reason=f"{why_not}; {UNFUSED.reason}")
    logits_bytes = 4 * sample.numel() * head.out_features
    if choice == "auto" and logits_bytes <= FUSE_ABOVE_BYTES:
        return dataclasses.replace(
            UNFUSED,
            reason=f"fp32 logits of a micro-batch are {logits_bytes / 2**20:,.0f} MiB, at most "
            f"{FUSE_ABOVE_BYTES / 2**20:,.0f} MiB: one or two chunks, fusing saves little there",
        )
    if choice == "auto" and sample.numel() < 2 * head.in_features:
        # torch's op keeps the weight's gradient from its forward: one more [V, d] buffer,
        # which outweighs the logits saved when a micro-batch has fewer rows than 2 d.
        return dataclasses.replace(
            UNFUSED,
            reason=f"{sample.numel()} rows per micro-batch, under twice the head's width "
            f"{head.in_features}: the fused loss's extra weight-sized buffer would cost more",
        )
    return LossPlan(
        "fused",
        f"head {why_not} found by a dry run; fp32 logits of a micro-batch would be "
        f"{logits_bytes / 2**20:,.0f} MiB (torch's chunked F.linear_cross_entropy); "
        f"{projection(precision)}",
        head,
    )


def projection(precision: Precision) -> str:
    """What the fused loss's projection runs in for `precision` (see `fused_next_token_loss`)."""
    if precision.device.type == "cuda" and precision.uses_autocast:
        return f"projection in {precision.name} with fp32 accumulation (torch's 'compact')"
    if precision.uses_autocast:
        return f"projection in fp32 on {precision.name}-rounded inputs (CPU)"
    return "projection in fp32"


@torch.no_grad()
def find_head(
    model: nn.Module, precision: Precision, sample: torch.Tensor
) -> tuple[nn.Linear | None, str]:
    """The `nn.Linear` whose output the model returns as its logits: `(head, its name)`.

    Returns `(None, reason)` where there is none, or where the model does more with it than
    return it (cast to another dtype at most), or computes its own loss from the logits.
    """
    if takes_targets(type(inner_model(model))):
        return None, "the forward computes its own loss from the logits (a `targets` parameter)"
    outputs: dict[str, list[torch.Tensor]] = {}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    hooks = [m.register_forward_hook(_recorder(outputs, name)) for name, m in linears.items()]
    was_training = model.training
    model.eval()
    try:  # the generators forked: the dry run leaves the run's randomness as it was
        devices = [sample.device] if sample.is_cuda else []
        with torch.random.fork_rng(devices=devices), precision.autocast():
            logits = forward_logits(model, sample, sample)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    for name, outs in outputs.items():
        out = outs[-1]
        is_head = out is logits or (
            out.shape == logits.shape and out.dtype != logits.dtype
            and torch.equal(out.to(logits.dtype), logits)
        )  # fmt: skip
        if is_head and len(outs) > 1:
            return None, f"the head `{name}` is called {len(outs)} times in one forward"
        if is_head:
            return linears[name], f"`{name}`"
    shaped = [n for n, o in outputs.items() if o[-1].shape == logits.shape]
    if shaped:
        return None, f"the model post-processes the output of its head `{shaped[0]}`"
    return None, "no nn.Linear's output is the returned logits"


def _recorder(outputs: dict[str, list[torch.Tensor]], name: str) -> Callable[..., None]:
    """A forward hook appending the module's output to `outputs[name]`."""

    def hook(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        outputs.setdefault(name, []).append(out)

    return hook
