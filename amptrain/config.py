"""Run settings as dataclasses with a docstring under each field, validated on construction.

`FitOptions` holds what the training loop needs and is what `amptrain.fit(**options)` checks;
`TrainConfig` adds what the `train` command builds (model, data, output) and is what
`config.json` stores, so a run can be repeated with `amptrain train --config config.json`.
Every bad value is refused here, naming the field and the limit, before a model is built.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from amptrain.errors import ConfigError
from amptrain.sizes import parse_size

BF16_TRUE = "bf16-true"
"""Lightning's name for bf16 weights: precision bf16 with `FitOptions.weights="bf16"`."""
STRATEGIES = ("ddp", "fsdp")
"""How several processes share the training: replicated (DDP) or sharded (FSDP2)."""
CHECKPOINT_FORMATS = ("auto", "full", "sharded")
"""How checkpoints are written: `auto` is `sharded` under FSDP, `full` otherwise."""
ALLOCATORS = ("auto", "system")
"""`auto` keeps freed host memory when the first steps fault (`amptrain.allocator`)."""


def _check(ok: bool, field: str, value: object, limit: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is invalid: it must be {limit}")


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """Settings of the training loop."""

    max_steps: int = 200
    """Optimizer steps to run (each is `grad_accum` micro-batches)."""
    batch_size: int = 16
    """Blocks per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup: float = 0.05
    """Fraction of max_steps spent in linear warm-up."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to biases or norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    clip_norm: float | None = 1.0
    """Clip the unscaled gradient norm to this; None disables clipping."""
    eval_every: int = 50
    """Evaluate every this many optimizer steps, and always at the end."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    log_every: int = 10
    """Write step metrics every this many optimizer steps (and on the last, evaluation and
    checkpoint steps). Each logging step reads the device's counters, a host sync, and under
    several processes agrees on stopping (a collective); the steps between run without either.
    10, against Lightning's 50 and the HF Trainer's 500: a sync in ten steps costs a GPU
    little, and a short run still gets a curve."""
    seed: int = 0
    """Seed of the batch order (and, in the CLI, of model initialisation)."""
    max_nonfinite: int = 25
    """Stop after this many consecutive non-finite steps (each one is skipped and counted)."""
    ignore_index: int = -100
    """Label value that the loss and accuracy ignore."""
    labels_shifted: bool = False
    """Labels given with the data are already the next tokens (`labels[:, t]` is the target of
    position t, as nanoGPT's `get_batch` returns them); by default they are aligned with the
    inputs, and data whose labels look shifted is refused."""
    init_scale: float = 65536.0
    """fp16: the GradScaler's first loss scale."""
    growth_factor: float = 2.0
    """fp16: the loss scale is multiplied by this after `growth_interval` finite steps."""
    backoff_factor: float = 0.5
    """fp16: the loss scale is multiplied by this after a step with inf/NaN gradients."""
    growth_interval: int = 2000
    """fp16: finite steps in a row before the loss scale grows."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end and when interrupted)."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a newer one is complete."""
    weights: str = "fp32"
    """The layers' trainable parameters' dtype: `fp32` (fp32 master weights under autocast) or
    `bf16` (bf16 weights, gradients and AdamW state with a compensated update: `--precision
    bf16-true`); embeddings and norms stay fp32. Needs precision bf16."""
    compensation: str = "kahan"
    """With bf16 weights, how an update too small for bf16 is kept: `kahan` (torch-optimi's
    Kahan summation, a bf16 compensation buffer: 10 bytes a parameter), `sr` (stochastic
    rounding seeded by the run's seed and step: 8 bytes) or `none` (nearest rounding, which
    drops updates under half a bf16 step: asked for only)."""
    optimizer_state: str = "32bit"
    """AdamW's moments: `32bit`, or `8bit` (bitsandbytes' blockwise 8-bit moments, 2 bytes a
    parameter instead of 8; tensors under 4,096 elements keep 32-bit state)."""
    micro_batch: str | None = None
    """`auto`: split each process's batch (`batch_size` x `grad_accum`) into the largest
    micro-batch whose step fits `memory_budget`, found by measuring a step, and accumulate the
    rest, so the global batch stays as asked. None: `batch_size` is the micro-batch."""
    memory_budget: str | None = None
    """The memory a process may use, e.g. `16GiB` or `12GB` (default: the device's memory
    less a tenth). `micro_batch="auto"` and `activation_checkpointing="auto"` plan within it."""
    optimizer_impl: str = "auto"
    """AdamW kernel: `auto` (fused where torch has it), `fused`, `foreach` or `for-loop`."""
    attention: str = "auto"
    """SDPA backend in the step: `auto` (measured at run start), `default` or `math`."""
    loss: str = "auto"
    """Next-token loss: `auto` (fused with the head where its fp32 logits would be large),
    `fused` (wherever the head is found) or `unfused`."""
    compile: bool | str = "auto"
    """Compile the step's forward and loss (`torch.compile`): true, false, or `auto` (when the
    run is long enough for the measured saving to repay the compile time)."""
    strategy: str = "ddp"
    """Several processes: `ddp` (every rank holds the whole model) or `fsdp` (parameters,
    gradients and optimizer state sharded over the ranks, one unit per repeated block)."""
    allocator: str = "auto"
    """CPU host memory: `auto` (glibc keeps freed memory for reuse when the first steps' page
    faults say it pays) or `system` (malloc left as it is)."""
    activation_checkpointing: str = "none"
    """Recompute the repeated blocks' activations in the backward to save memory: `none`,
    `full` (every block), `every:N` (blocks 0, N, 2N...), `selective` (every block keeps its
    matmul and attention outputs, recomputes the rest) or `auto` (none, until a memory budget
    needs more)."""
    checkpoint_format: str = "auto"
    """`sharded` (every rank writes its part with torch.distributed.checkpoint; resumes on any
    number of processes), `full` (rank 0 writes the whole state, gathered under fsdp) or
    `auto` (sharded under fsdp, full otherwise)."""

    def __post_init__(self) -> None:
        for field in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches",
                      "log_every", "max_nonfinite", "checkpoint_every", "keep_last",
                      "growth_interval"):  # fmt: skip
            value = getattr(self, field)
            least = 0 if field in ("max_steps", "checkpoint_every") else 1
            _check(_is_int(value) and value >= least, field, value, f"an integer >= {least}")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed", self.seed,
               "an integer from 0 to 2**63 - 1 (torch's generators take 64-bit seeds)")  # fmt: skip
        _check(_finite(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        _check(_finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
               self.min_lr_ratio, "in [0, 1]")  # fmt: skip
        _check(_finite(self.warmup) and 0 <= self.warmup < 1, "warmup", self.warmup,
               "a fraction in [0, 1)")  # fmt: skip
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
               self.weight_decay, "a finite number >= 0")  # fmt: skip
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else ()
        _check(len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas), "betas",
               self.betas, "two numbers in [0, 1)")  # fmt: skip
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        _check(_finite(self.init_scale) and self.init_scale > 0, "init_scale", self.init_scale,
               "a finite number > 0")  # fmt: skip
        _check(_finite(self.growth_factor) and self.growth_factor > 1, "growth_factor",
               self.growth_factor, "a finite number > 1")  # fmt: skip
        _check(_finite(self.backoff_factor) and 0 < self.backoff_factor < 1, "backoff_factor",
               self.backoff_factor, "in (0, 1)")  # fmt: skip
        _check(self.weights in ("fp32", "bf16"), "weights", self.weights, "fp32 or bf16")
        _check(self.compensation in ("kahan", "sr", "none"), "compensation", self.compensation,
               "kahan, sr or none")  # fmt: skip
        _check(self.optimizer_state in ("32bit", "8bit"), "optimizer_state",
               self.optimizer_state, "32bit or 8bit")  # fmt: skip
        _check(self.micro_batch in (None, "auto"), "micro_batch", self.micro_batch,
               "auto, or unset (batch_size is the micro-batch)")  # fmt: skip
        if self.memory_budget is not None:
            parse_size(self.memory_budget)
        impls = ("auto", "fused", "foreach", "for-loop")
        _check(self.optimizer_impl in impls, "optimizer_impl", self.optimizer_impl,
               f"one of {', '.join(impls)}")  # fmt: skip
        _check(isinstance(self.compile, bool) or self.compile == "auto", "compile", self.compile,
               'true, false or "auto"')  # fmt: skip
        _check(self.strategy in STRATEGIES, "strategy", self.strategy,
               f"one of {', '.join(STRATEGIES)}")  # fmt: skip
        _check(self.checkpoint_format in CHECKPOINT_FORMATS, "checkpoint_format",
               self.checkpoint_format, f"one of {', '.join(CHECKPOINT_FORMATS)}")  # fmt: skip
        attention = ("auto", "default", "math")
        _check(self.attention in attention, "attention", self.attention,
               f"one of {', '.join(attention)}")  # fmt: skip
        _check(self.allocator in ALLOCATORS, "allocator", self.allocator,
               f"one of {', '.join(ALLOCATORS)}")  # fmt: skip
        ac = self.activation_checkpointing
        _check(isinstance(ac, str) and re.fullmatch(r"none|auto|full|selective|every:[1-9]\d*", ac)
               is not None, "activation_checkpointing", ac,
               "none, full, every:N (N >= 1), selective or auto")  # fmt: skip
        losses = ("auto", "fused", "unfused")
        _check(self.loss in losses, "loss", self.loss, f"one of {', '.join(losses)}")
        clip = self.clip_norm
        _check(clip is None or (_finite(clip) and clip > 0), "clip_norm", clip,
               "a finite number > 0, or None for no clipping")  # fmt: skip

    @property
    def scaler_options(self) -> dict[str, float]:
        """The GradScaler settings, as keyword arguments."""
        names = ("init_scale", "growth_factor", "backoff_factor", "growth_interval")
        return {name: getattr(self, name) for name in names}

    @property
    def warmup_steps(self) -> int:
        """Warm-up length in optimizer steps."""
        return int(round(self.warmup * self.max_steps))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `amptrain train` needs to build and run a training job."""

    model: str = "tiny-gpt"
    """`tiny-gpt`, `path/to/file.py:Name`, a run directory, or a local Hugging Face directory."""
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    """Keyword arguments for the model; for tiny-gpt: n_layer, n_embd, n_head, dropout."""
    init_from: str | None = None
    """Start from these weights: a run directory, a checkpoint directory, or a weights file."""
    data: str = "builtin"
    """`builtin` (the standard-library corpus), a file (text, .jsonl, .json, .csv, .tsv,
    .parquet, or a .bin of token ids), a `datasets` save_to_disk folder, or a folder of files."""
    text_field: str = "text"
    """The field (column) that holds the text in .jsonl, .json, .csv, .tsv, .parquet and
    `datasets` data."""
    prompt_field: str = "prompt"
    """Instruction data: the field of a record that holds the prompt (read, not scored)."""
    completion_field: str = "completion"
    """Instruction data: the field that holds the completion (scored). Records with `messages`
    (role/content turns) are chat data, their assistant turns scored."""
    long_examples: str = "truncate"
    """Instruction and chat examples longer than the context: `truncate` (cut from the prompt
    side) or `drop` (left out, counted)."""
    data_dtype: str = "uint16"
    """The ids of a .bin token file without a header: uint16 (nanoGPT's) or uint32 (for
    vocabularies over 65,536); litgpt's files state their own."""
    tokenizer: str | None = None
    """A local `tokenizer.json`; None for UTF-8 byte tokens."""
    context: int = 128
    """Tokens per training block."""
    val_fraction: float = 0.1
    """Fraction of blocks held out for validation (when `val_data` is not given)."""
    val_data: str | None = None
    """Held-out data to validate on, read as `data` is (a file, a folder, or a `datasets`
    split's folder; a `DatasetDict` folder gives its `validation` or `test` split); all of
    `data` then trains."""
    lora: int = 0
    """LoRA rank: train adapters of this rank on a frozen base (PEFT); 0 trains every weight."""
    lora_alpha: float | None = None
    """LoRA alpha (the adapters' output is scaled by alpha / rank); default twice the rank."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' input."""
    lora_targets: str | None = None
    """Comma-separated names of the layers to adapt (a layer matches when its name is or ends
    with one); default the linear layers of the repeated blocks."""
    epochs: float | None = None
    """Passes over the training blocks; sets `max_steps` (`train` only) from the data's size."""
    precision: str = "auto"
    """fp32, tf32, fp16, bf16, auto, or a Lightning alias such as bf16-mixed."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`..."""
    out: str = "runs"
    """Folder in which the run directory is created."""
    fit: FitOptions = dataclasses.field(default_factory=FitOptions)
    """Settings of the training loop."""

    def __post_init__(self) -> None:
        for field in ("model", "data", "text_field", "prompt_field", "completion_field",
                      "precision", "device", "out"):  # fmt: skip
            value = getattr(self, field)
            _check(isinstance(value, str) and value != "", field, value, "a non-empty string")
        _check(self.val_data is None or (isinstance(self.val_data, str) and self.val_data != ""),
               "val_data", self.val_data, "a path, or null")  # fmt: skip
        _check(_is_int(self.lora) and self.lora >= 0, "lora", self.lora,
               "an integer >= 0 (the rank; 0 for a full fine-tune)")  # fmt: skip
        _check(self.lora_alpha is None or (_finite(self.lora_alpha) and self.lora_alpha > 0),
               "lora_alpha", self.lora_alpha, "a number > 0, or null: twice the rank")  # fmt: skip
        _check(_finite(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout",
               self.lora_dropout, "in [0, 1)")  # fmt: skip
        _check(self.lora_targets is None or isinstance(self.lora_targets, str), "lora_targets",
               self.lora_targets, "comma-separated layer names, or null")  # fmt: skip
        _check(self.epochs is None or (_finite(self.epochs) and self.epochs > 0), "epochs",
               self.epochs, "a number > 0 (passes over the training data), or null")  # fmt: skip
        _check(self.tokenizer is None or isinstance(self.tokenizer, str), "tokenizer",
               self.tokenizer, "a path to a tokenizer.json, or null")  # fmt: skip
        _check(self.data_dtype in ("uint16", "uint32"), "data_dtype", self.data_dtype,
               "uint16 or uint32")  # fmt: skip
        _check(self.long_examples in ("truncate", "drop"), "long_examples", self.long_examples,
               "truncate or drop")  # fmt: skip
        _check(_is_int(self.context) and self.context >= 2, "context", self.context,
               "an integer >= 2")  # fmt: skip
        _check(_finite(self.val_fraction) and 0 < self.val_fraction < 1, "val_fraction",
               self.val_fraction, "in (0, 1)")  # fmt: skip
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs must be a JSON object, got {self.model_kwargs!r}")
        if isinstance(self.fit, dict):
            object.__setattr__(self, "fit", FitOptions(**_known(FitOptions, self.fit, "fit")))
        elif not isinstance(self.fit, FitOptions):
            raise ConfigError(f"fit must be a JSON object of loop settings, got {self.fit!r}")
        if self.precision.lower() == BF16_TRUE:  # bf16 autocast with bf16 weights
            object.__setattr__(self, "precision", "bf16")
            object.__setattr__(self, "fit", dataclasses.replace(self.fit, weights="bf16"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_dict()` output; unknown keys are refused by name."""
        return cls(**_known(cls, values, "config"))


def run_values(saved: dict[str, Any]) -> dict[str, Any]:
    """The `TrainConfig` fields of a run's `config.json`.

    A run's config also names its `command`, keeps that command's own settings under the
    command's name and records the `environment`; none of those is a `TrainConfig` field.
    """
    command = saved.get("command")
    drop = {"command", "environment", *([command] if isinstance(command, str) else [])}
    return {k: v for k, v in saved.items() if k not in drop}


def _known(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}{_nearest(unknown[0])}; known "
                          f"keys: {sorted(names)}")  # fmt: skip
    return values


def _nearest(key: str) -> str:
    """`; did you mean fit.lr?` for the setting nearest an unknown key, where one is near."""
    import difflib

    places = {f.name: f.name for f in dataclasses.fields(TrainConfig)}
    places.update({f.name: f"fit.{f.name}" for f in dataclasses.fields(FitOptions)})
    near = difflib.get_close_matches(key.replace("-", "_"), list(places), n=1, cutoff=0.6)
    return f" (did you mean {places[near[0]]}?)" if near else ""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


COMPARE_STEPS = 50
"""Optimizer steps per training run of `amptrain compare`: its default budget."""
SEARCH_BUDGET_STEPS = 32
"""The default token budget of a search trial: this many steps' tokens at the base batch size."""
SEARCH_PRUNERS = ("median", "hyperband", "none")
"""The pruners `amptrain search` offers."""
HEARTBEAT_INTERVAL = 60
"""RDB search storages: seconds between a worker's signs of life."""
GRACE_PERIOD = 180
"""RDB search storages: seconds of silence before a RUNNING trial is failed and retried once."""
