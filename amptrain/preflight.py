"""The checks `fit` makes before its first training kernel, callable on their own.

`fit` starts with `preflight`; a workflow that writes files before training (`run_training`)
calls it first, so that bad input is refused before a run directory exists or any file of a
resumed run is touched. A resumed run's precision is decided here too: the checkpoint's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from amptrain import checkpoint_state, distributed, memory_plan, recompute, resharding, sharding
from amptrain import data as data_mod
from amptrain.adapter import probe_vocab, training_device
from amptrain.checkpoint import Checkpoint, CheckpointError
from amptrain.config import BF16_TRUE, FitOptions
from amptrain.errors import ConfigError, ModelError
from amptrain.models.limits import check_context
from amptrain.optim import STATE_FORMATS_CHANGED, state_format
from amptrain.precision import Precision, resolve, resumed

__all__ = ["check_data", "preflight", "resolve_precision"]


def preflight(
    model: nn.Module,
    train: object,
    val: object | None = None,
    *,
    precision: str | Precision = "auto",
    source: str = "model",
    resume: Checkpoint | None = None,
    allow_new_scaler: bool = False,
    **options: Any,
) -> tuple[FitOptions, Precision, data_mod.Blocks, data_mod.Blocks | None]:
    """Every check `fit` makes before its first training kernel, with what they resolve.

    `fit` starts with it, and a caller that writes files first (`run_training`) calls it
    before creating or touching any, so bad input leaves nothing behind. It changes neither
    the model nor the checkpoint. A resumed run keeps its checkpoint's precision (see
    `precision.resumed`).

    Returns:
        The options, the resolved precision, and the training and validation blocks.

    Raises:
        ConfigError, DataError, ModelError, PrecisionError, CheckpointError: The refusal.
    """
    if isinstance(precision, str) and precision.lower() == BF16_TRUE:  # bf16 weights
        precision, options = "bf16", {**options, "weights": "bf16"}
    opts = FitOptions(**options)
    world_size = distributed.world()[1]
    check_parameter_dtypes(model, source)
    sharding.check_shardable(model, opts.strategy, source)
    recompute.check(model, opts.activation_checkpointing)
    check_optimizer_state(opts)
    opts = resharding.keep_global_batch(opts, resume, world_size)  # another number of processes
    device = training_device(model, source)
    memory_plan.check_footprint(model, opts, device, source)
    prec = resolve_precision(precision, device, resume, allow_new_scaler, **opts.scaler_options)
    check_weights(opts, prec)
    train_b, val_b = check_data(model, train, val, device, source, opts.ignore_index,
                                opts.batch_size, opts.labels_shifted)  # fmt: skip
    data_mod.check_batch_size(train_b, opts.batch_size, world_size)
    if resume is not None:
        checkpoint_state.check_resumable(resume, model, prec, allow_new_scaler)
        trained = resume.trainer.get("weights", "fp32")
        if trained != opts.weights:
            raise CheckpointError(f"{resume.path} was trained with {trained} weights and this "
                                  f"run asks for {opts.weights}; resume with the same weights "
                                  "(--precision bf16-true for bf16)")  # fmt: skip
        check_state_format(resume, opts, world_size)
    return opts, prec, train_b, val_b


def check_state_format(resume: Checkpoint, opts: FitOptions, world_size: int) -> None:
    """Refuse a checkpoint whose optimizer state another optimizer wrote (`optim.state_format`).

    Raises:
        CheckpointError: Naming both formats and the way to resume.
    """
    sharded = sharding.will_shard(opts.strategy, world_size)
    wanted = state_format(opts, sharded)
    saved = resume.trainer.get("optimizer_format")
    if saved == wanted or (saved is None and wanted not in STATE_FORMATS_CHANGED):
        return
    if saved is None:
        raise CheckpointError(f"{resume.path}'s optimizer state predates this amptrain's "
                              f"layout for it ({wanted}); start the run anew from its weights "
                              "(--init-from)")  # fmt: skip
    how = "resume with the options it was written with"
    if opts.optimizer_state == "8bit" and opts.weights == "fp32":
        how = ("8-bit state is bitsandbytes' in one process or under DDP, amptrain's on "
               "FSDP2's shards: resume with the strategy and number of processes it was "
               "written with")  # fmt: skip
    raise CheckpointError(f"{resume.path}'s optimizer state was written by {saved} and this "
                          f"run's optimizer is {wanted}; {how}")  # fmt: skip


def check_weights(opts: FitOptions, prec: Precision) -> None:
    """Refuse bf16 weights where they cannot train as documented, before any work.

    Raises:
        ModuleNotFoundError: Without torch-optimi (the `memory` extra).
        ConfigError: For another precision than bf16, gradient accumulation under DDP (the
            skipped reductions would sum bf16 gradients in bf16; FSDP2 sums them in fp32), or
            8-bit state without stochastic rounding.
    """
    if opts.weights != "bf16":
        return
    from amptrain._imports import requires

    if opts.compensation != "sr":  # Kahan summation and nearest rounding: torch-optimi's AdamW
        requires("optimi", "memory", "--precision bf16-true", "use --compensation sr")
    why = None
    if distributed.world()[1] > 1 and opts.grad_accum > 1 and opts.strategy != "fsdp":
        why = ("under DDP they take --grad-accum 1 (DDP would sum the skipped reductions' "
               "bf16 gradients in bf16); raise --batch-size, or use --strategy fsdp, which "
               "sums them in fp32")  # fmt: skip
    elif opts.optimizer_impl not in ("auto", "for-loop"):
        why = (f"their optimizer is a for-loop AdamW of its own (--compensation "
               f"{opts.compensation}), not --optimizer-impl {opts.optimizer_impl}; leave it at "
               "auto")  # fmt: skip
    elif prec.name != "bf16":
        why = f"they need precision bf16 (the run's is {prec.name})"
    elif opts.optimizer_state == "8bit" and opts.compensation != "sr":
        why = (f"8-bit AdamW state takes --compensation sr (stochastic rounding); Kahan "
               f"summation's buffer needs 16-bit moments (asked: {opts.compensation})")  # fmt: skip
    if why:
        raise ConfigError(f"bf16 weights (--precision bf16-true): {why}")


def check_optimizer_state(opts: FitOptions) -> None:
    """Refuse 8-bit optimizer state where it cannot run, before any work.

    Raises:
        ModuleNotFoundError: Without bitsandbytes (the `memory` extra).
    """
    if opts.optimizer_state != "8bit":
        return
    from amptrain._imports import requires

    requires("bitsandbytes", "memory", "--optimizer-state 8bit", "leave it at 32bit")


def check_parameter_dtypes(model: nn.Module, source: str) -> None:
    """Refuse a model whose trainable parameters are fp16 or bf16.

    amptrain keeps fp32 master weights and runs the forward pass in the precision's autocast;
    half-precision parameters would train in pure half precision while the run reports another
    precision (and fp16's loss scaler cannot unscale fp16 gradients). `--precision bf16-true`
    casts the matrices itself, for the run only (`low_weights`).

    Raises:
        ModelError: Naming how many parameters, one of them, and the fix.
    """
    low = [(name, p.dtype) for name, p in model.named_parameters()
           if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)]  # fmt: skip
    if low:
        name, dtype = low[0]
        raise ModelError(
            f"{source} has {len(low)} trainable parameter tensor(s) in {str(dtype)[6:]} (e.g. "
            f"{name!r}); amptrain keeps fp32 master weights and lowers the compute with "
            "--precision (autocast): cast the model with model.float() (Hugging Face: load it "
            "with dtype=torch.float32) and train with --precision bf16 or fp16"
        )


def resolve_precision(
    precision: str | Precision,
    device: torch.device,
    resume: Checkpoint | None = None,
    allow_new_scaler: bool = False,
    asked_by: str = "--precision",
    **scaler_options: float,
) -> Precision:
    """`precision.resolve`, except that a resumed run keeps its checkpoint's precision.

    With `resume`, `auto` is not decided again but taken from the checkpoint, and another
    precision is refused (see `precision.resumed`); the reason says so and quotes the
    checkpoint's own.
    """
    trained = resume.precision if resume is not None else None
    if trained is None:
        return resolve(precision, device, **scaler_options)
    asked = precision.name if isinstance(precision, Precision) else precision
    kept = resumed(trained, asked, f"checkpoint {resume.path}", allow_new_scaler, asked_by)
    if isinstance(precision, Precision):
        return precision
    prec = resolve(kept, device, **scaler_options)
    before = resume.trainer.get("precision_reason")
    prec.reason = (
        f"resumed: {kept}, the precision {resume.path.name} was trained in"
        + (f" ({before})" if before else "")
        if kept == trained
        else f"resumed from {resume.path.name} ({trained}) in {kept}, as requested"
    )
    return prec


def check_data(
    model: nn.Module,
    train: object,
    val: object | None,
    device: torch.device,
    source: str,
    ignore_index: int,
    batch_size: int = 1,
    labels_shifted: bool = False,
) -> tuple[data_mod.Blocks, data_mod.Blocks | None]:
    """Convert the data to blocks and check them against the model before any work.

    The context must fit the model's positions and the memory, and every id must be inside
    the model's probed vocabulary.
    """
    train_b = data_mod.as_blocks(train, name="training data", labels_shifted=labels_shifted)
    val_b = None
    if val is not None:
        val_b = data_mod.as_blocks(val, name="validation data", labels_shifted=labels_shifted)
    check_context(model, train_b.context, batch_size, device, source)
    vocab = probe_vocab(model, train_b.context, device, source)
    for blocks in (train_b, val_b):
        if blocks is not None:
            data_mod.check_ids(blocks, vocab, ignore_index)
    return train_b, val_b
