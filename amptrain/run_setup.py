"""What a `TrainConfig` asks for, built and checked: device, precision, tokenizer, data, model.

Each piece is checked before anything is created.

Every workflow that trains or loads what `train` trains (`train`, `search`, `bench`, `eval`,
`generate`, `compare`, the doctor) builds it here, so they read data and models alike.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import checkpoint, data, distributed, lora, memory_plan, sharding
from amptrain.adapter import probe_vocab
from amptrain.config import TrainConfig
from amptrain.errors import (
    AmptrainError,
    ConfigError,
    DataError,
)
from amptrain.models import GPTConfig, ModelSpec, build_model
from amptrain.models.limits import check_context
from amptrain.models.trained import load_into, run_config, run_tokenizer
from amptrain.precision import Precision
from amptrain.preflight import resolve_precision

log = logging.getLogger("amptrain")


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; other names must exist on this machine.

    Under torchrun, CUDA means this rank's GPU (LOCAL_RANK).
    """
    if distributed.launched_by_torchrun() and name in ("auto", "cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r} is not a device ({exc}); try cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: none of amptrain's paths
        raise ConfigError(
            f"--device {name} is not supported: amptrain trains on cpu or cuda (cuda:N); use "
            "--device cpu, or a machine with an NVIDIA GPU"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) "
                          "(cuda:0 up); name one of them")  # fmt: skip
    return device


def prepare(
    cfg: TrainConfig, resume: checkpoint.Checkpoint | None = None, **keep: Any
) -> tuple[nn.Module, data.Blocks, data.Blocks, Precision]:
    """Resolve the precision, load and split the data, and build the model on its device.

    Everything that can be refused is checked here, before any training kernel runs. With
    `resume`, the precision is the checkpoint's (`keep`: `allow_new_scaler`, `asked_by`, see
    `preflight.resolve_precision`).
    """
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, resume, **keep,
                                  **cfg.fit.scaler_options)  # fmt: skip
    tokenizer = tokenizer_for(cfg)
    if cfg.model == "tiny-gpt":
        check_model_size(cfg, tokenizer.vocab_size, device)
    blocks = load_data(cfg, tokenizer)
    if cfg.val_data is None:
        train, val = data.split(blocks, cfg.val_fraction, cfg.fit.seed)
    else:
        train, val = blocks, load_data(cfg, tokenizer, held_out=True)
    torch.manual_seed(cfg.fit.seed)  # the same seed gives the same initial weights
    model = model_factory(cfg, torch.device("cpu"))()
    sharding.check_shardable(model, cfg.fit.strategy, cfg.model)
    if cfg.init_from:
        load_into(model, cfg.init_from)
    if cfg.lora:
        model = lora.apply(model, lora_settings(cfg), precision.dtype)
    model = model.to(device)
    check_context(model, cfg.context, cfg.fit.batch_size, device, cfg.model)
    if str(cfg.data).lower().endswith(".bin") and blocks.max_id is not None:
        check_token_file(model, blocks, cfg, device)
    return model, train, val, precision


def lora_settings(cfg: TrainConfig) -> lora.LoraSettings:
    """The LoRA settings of `cfg` (`cfg.lora` is the rank).

    Raises:
        ConfigError: For `--lora` with `--strategy fsdp`, which PEFT's wrapped layers do not
            shard under FSDP2 here (DDP and one process take it), or with sharded checkpoints,
            which would hold the frozen base too.
    """
    if cfg.fit.strategy == "fsdp":
        raise ConfigError("--lora with --strategy fsdp is not supported: the adapters are small "
                          "and the base is frozen, so --strategy ddp holds them on every "
                          "process; use ddp")  # fmt: skip
    if cfg.fit.checkpoint_format == "sharded":
        raise ConfigError("--lora with --checkpoint-format sharded is not supported: a LoRA "
                          "checkpoint holds the adapters alone, written whole; use "
                          "--checkpoint-format full (the default)")  # fmt: skip
    return lora.LoraSettings(cfg.lora, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)


def check_before_launch(cfg: TrainConfig) -> None:
    """Refuse, before `--nproc` starts any process, a model `cfg.fit.strategy` cannot shard.

    The model is built on the meta device (no memory, no weights): only its module tree is
    needed. A model that cannot be built there is left to the processes' own checks.

    Raises:
        ModelError: A model FSDP cannot shard; also a model that cannot be built at all.
    """
    if cfg.lora:
        lora_settings(cfg)
    if cfg.fit.strategy != "fsdp":
        return
    meta = torch.device("meta")
    try:
        with meta:
            model = model_factory(cfg, meta)()
    except (AmptrainError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - the processes build it on their own device
        log.debug("model not built on the meta device (%s); the processes check it", exc)
        return
    sharding.check_shardable(model, cfg.fit.strategy, cfg.model)


def load_data(
    cfg: TrainConfig, tokenizer: data.ByteTokenizer | data.JsonTokenizer, held_out: bool = False
) -> data.Blocks:
    """The blocks of `cfg.data` (`held_out`: of `cfg.val_data`), read as its name says.

    Every command loads its data here. A `DatasetDict` folder as `val_data` gives its
    `validation` split, else its `test` split.
    """
    source = data.held_out_source(cfg.val_data) if held_out else cfg.data
    fields = data.ExampleFields(cfg.prompt_field, cfg.completion_field,
                                long_examples=cfg.long_examples)  # fmt: skip
    return data.load(source, cfg.context, tokenizer, cfg.text_field, cfg.data_dtype, fields,
                     cfg.fit.ignore_index)  # fmt: skip


def steps_for_epochs(cfg: TrainConfig, train: data.Blocks, world_size: int = 1) -> int:
    """The optimizer steps of `cfg.epochs` passes over `train` at the run's global batch.

    An epoch is the whole optimizer steps of the training blocks (`data.batches` ends an
    epoch on the last whole window of `grad_accum` global batches); a fraction of an epoch
    rounds up to a whole step.
    """
    data.check_batch_size(train, cfg.fit.batch_size, world_size)
    global_batch = cfg.fit.batch_size * world_size
    windows = len(train) // (global_batch * cfg.fit.grad_accum)
    steps = windows or len(train) // global_batch / cfg.fit.grad_accum  # under one window
    return max(1, math.ceil(cfg.epochs * steps))


def check_token_file(
    model: nn.Module, blocks: data.Blocks, cfg: TrainConfig, device: torch.device
) -> None:
    """Refuse a token file whose largest id the model cannot embed, before any run directory.

    Raises:
        DataError: Naming the file, its largest id, the model's vocabulary and the fixes.
    """
    vocab = probe_vocab(model, cfg.context, device, cfg.model)
    if blocks.max_id >= vocab:
        need = -(-(blocks.max_id + 1) // 64) * 64
        fix = (
            f"--model-kwargs '{{\"vocab_size\": {need}}}'"
            if cfg.model == "tiny-gpt"
            else "a model with a larger vocabulary"
        )
        raise DataError(
            f"--data {cfg.data} has token id {blocks.max_id}, outside the model's vocabulary "
            f"[0, {vocab}); pass the tokenizer the file was made with (--tokenizer) or {fix}, "
            f"or check --data-dtype ({cfg.data_dtype})"
        )


def check_model_size(cfg: TrainConfig, vocab_size: int, device: torch.device) -> None:
    """Refuse a tiny-gpt too large for `device` from its parameter count, before allocating it.

    Raises:
        ConfigError: Naming the sizes, the estimate and the device's memory.
    """
    try:
        gpt = GPTConfig(**{"vocab_size": vocab_size, "block_size": cfg.context,
                           **cfg.model_kwargs})  # fmt: skip
    except TypeError as exc:
        known = sorted(f.name for f in dataclasses.fields(GPTConfig))
        raise ConfigError(
            f"model_kwargs {cfg.model_kwargs}: {exc}; tiny-gpt takes {known}"
        ) from None
    per_param = memory_plan.bytes_per_parameter(cfg.fit, lowered=True)  # the levers' bytes
    need, (have, whence) = gpt.n_params * per_param, memory_plan.budget_bytes(cfg.fit, device)
    if need > have:
        raise ConfigError(
            f"model_kwargs n_layer={gpt.n_layer}, n_embd={gpt.n_embd} with context "
            f"{gpt.block_size}: tiny-gpt would have {gpt.n_params:.3g} parameters and training "
            f"them needs at least {need / 2**30:,.1f} GiB ({per_param} bytes a parameter), more "
            f"than the {have / 2**30:,.1f} GiB budget ({whence}) of {device}; choose a smaller "
            "--width, --layers or --context, or lower the bytes a parameter with --precision "
            "bf16-true or --optimizer-state 8bit"
        )


def model_factory(cfg: TrainConfig, device: torch.device) -> Callable[[], nn.Module]:
    """A function that builds the configured model afresh on `device` (the caller seeds it)."""
    spec, vocab = ModelSpec(cfg.model, dict(cfg.model_kwargs)), tokenizer_for(cfg).vocab_size
    return lambda: build_model(spec, vocab, cfg.context).to(device)


def tokenizer_for(cfg: TrainConfig) -> data.ByteTokenizer | data.JsonTokenizer:
    """The configured tokenizer: `--tokenizer`, the model directory's own, or UTF-8 bytes."""
    path = tokenizer_file(cfg)
    if path is None:
        return data.ByteTokenizer()
    if not cfg.tokenizer and run_config(cfg.model) is None:
        _say_tokenizer(Path(path))
    return data.JsonTokenizer(path)


def tokenizer_file(cfg: TrainConfig) -> str | None:
    """The tokenizer.json of `tokenizer_for`, or None for UTF-8 bytes."""
    if cfg.tokenizer:
        folder = Path(cfg.tokenizer)
        return str(folder / "tokenizer.json") if folder.is_dir() else cfg.tokenizer
    if run_config(cfg.model) is not None:  # a run directory as the model: its tokenizer
        return run_tokenizer(cfg.model)
    hf_tokenizer = Path(cfg.model) / "tokenizer.json"
    if cfg.model != "tiny-gpt" and hf_tokenizer.is_file():
        return str(hf_tokenizer)
    return None


@functools.cache
def _say_tokenizer(path: Path) -> None:
    """Once per process: a run asks for its tokenizer more than once."""
    log.info("using the model directory's tokenizer %s", path)
