"""The original tier-3 API (`test_fine_tuning`, ...) as thin mappings over amptrain's core.

Notebooks written against the original Colab toolkit run unchanged: the names, signatures and
return keys are the original ones; the work is done by `amptrain.fit`,
`amptrain.bench.bench`, `amptrain.search.search` and `amptrain.compare.compare`. The
original's defects are not carried over, which changes behaviour as follows:

- Data: with no `train_data`, the models train on real text, the built-in corpus (the
  standard library's source) as byte tokens, not on uniform random tokens (nothing to learn).
  The same blocks every call (seeded), so runs are comparable. A model with a vocabulary under
  256 gets byte ids modulo its vocabulary (noted in the log). Sequences of unequal length are
  padded and the padding is ignored by the loss; the 80/20 validation split is seeded-random.
- Vocabulary: read from the model's logits (a probe forward); a `config.vocab_size` that
  disagrees is reported and not used.
- `use_amp=True`: fp16 with loss scaling on CUDA, bf16 on a CPU with AMX-BF16/AVX512-BF16,
  else fp32; the choice and its reason are logged and returned (`precision`,
  `precision_reason`); bf16 counts as AMP (`amp_enabled`). AMP keys on the model's device.
- Training: AdamW with weight decay on matrices only, linear warm-up (5%) and cosine decay
  counted in optimizer steps (so accumulation and uneven batches no longer bend the schedule),
  no scheduler step after a skipped step, gradient norms recorded before clipping and inf
  norms left out of the per-epoch maximum, a partial last batch of an epoch dropped.
  Validation runs batched under the same autocast as training, token-weighted.
- Timing: `training_time_seconds` and `samples_per_second` cover training steps only, not
  validation; `train/accuracy` is measured at each epoch's end on up to as many training
  blocks as there are validation blocks, in eval mode.
- No console banners, plots, `pip freeze` or `./environment/` files: progress goes to the
  `amptrain` logger; plot with `amptrain.runs.plotting`. The model is left in eval mode as before.
- W&B (`use_wandb=True`): one warning instead of an exception or a warning per epoch; metrics
  at the global optimizer step; into the active `wandb.run` when there is one (W&B's own step,
  with `global_step` as the x-axis, so a second call is not dropped), else into a new run.
- `test_amp_speedup_benchmark`: runs on CPU too (bf16), interleaved repeats with warm-up on
  identical weights and batches (`amptrain.bench`), memory per arm in isolation; the model
  is not modified; `fp16_results` holds the AMP arm (bf16 on CPU, see `amp_precision`).
- `MetricsTracker`: perplexity is not clipped; accuracy with no valid label is nan; the GPU
  memory figure is the peak since the previous epoch; GPU utilisation (sampled at idle) is
  not in the record; W&B logs at W&B's own step with `epoch` in the record.
- `compute_effective_precision`: a bf16 request stays bf16 when `use_amp` is on; unknown
  strings (`'16_true'`) and an fp16 request that Lightning would turn into bf16 are returned
  as before, with a warning.
- `AmpWandbCallback`: bf16 counts as AMP, loss scale and skipped steps come from the
  trainer's scaler, records carry `trainer/global_step`; it must be passed when the Trainer is
  built. A trainer-like object called by hand gets the original's epoch record.
  `test_hyperparameter_search` and `test_benchmark_comparison`: see their docstrings (a
  baseline directory without tokenizer files is refused).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn

from amptrain import capability
from amptrain import data as data_mod
from amptrain._imports import PANDAS_AVAILABLE, WANDB_AVAILABLE
from amptrain.adapter import probe_vocab
from amptrain.callbacks import Callback
from amptrain.compat.bench import (
    test_amp_speedup_benchmark,
    test_benchmark_comparison,
    test_hyperparameter_search,
)
from amptrain.compat.utils import MetricsTracker, compute_effective_precision
from amptrain.errors import ConfigError
from amptrain.loop import FitResult, evaluate, fit
from amptrain.precision import Precision

log = logging.getLogger("amptrain")

__all__ = [
    "AmpWandbCallback",  # noqa: F822 (provided by __getattr__, on first use)
    "MetricsTracker",
    "compute_effective_precision",
    "test_amp_speedup_benchmark",
    "test_benchmark_comparison",
    "test_fine_tuning",
    "test_hyperparameter_search",
]

SAMPLES, LENGTH = 50, 32  # the original's default data: 50 sequences of 32 tokens


def __getattr__(name: str) -> Any:
    if name == "AmpWandbCallback":  # built on first use: Lightning takes seconds to import
        from amptrain.compat.utils import AmpWandbCallback

        return AmpWandbCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def amp_precision(use_amp: bool, device: torch.device) -> Precision:
    """What `use_amp` means on `device`: fp16 on CUDA, bf16 on a CPU with fast bf16, else fp32."""
    if not use_amp:
        return Precision("fp32", device, "use_amp=False")
    if device.type == "cuda":
        return Precision("fp16", device, "use_amp=True on CUDA: fp16 autocast with GradScaler")
    if device.type != "cpu":
        return Precision("fp32", device, f"use_amp=True, but {device.type} has no AMP rule: fp32")
    caps = capability.probe(device)
    if caps.clearly_faster("bf16"):
        return Precision("bf16", device, f"use_amp=True on a CPU with fast bf16 "
                         f"({caps.figures('bf16')}): bf16 autocast", caps)  # fmt: skip
    return Precision("fp32", device, f"use_amp=True, but this CPU has no fast bf16 "
                     f"({caps.figures('bf16')}) and fp16 needs CUDA here: fp32", caps)  # fmt: skip


def model_vocab(model: nn.Module, config: Any, context: int) -> int:
    """The model's vocabulary, from its logits; a disagreeing `config.vocab_size` is reported."""
    device = next(model.parameters()).device
    vocab = probe_vocab(model, context, device, "model")
    declared = getattr(config, "vocab_size", None)
    if declared is not None and int(declared) != vocab:
        log.warning("config.vocab_size=%s but the model predicts %d tokens; using %d",
                    declared, vocab, vocab)  # fmt: skip
    return vocab


def context_length(config: Any, model: nn.Module | None = None) -> int:
    """32 tokens, the original's length, or less when the config or the model says so.

    The limit is `config.max_seq_len`, else the model's own (`block_size`, `n_positions`,
    `max_position_embeddings` or `max_seq_len` on the model or its `.config`).
    """
    limit = getattr(config, "max_seq_len", None)
    for holder in (model, getattr(model, "config", None)):
        for name in ("block_size", "n_positions", "max_position_embeddings", "max_seq_len"):
            if limit is None and isinstance(getattr(holder, name, None), int):
                limit = getattr(holder, name)
    return max(2, min(LENGTH, int(limit))) if limit else LENGTH


def builtin_samples(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """`n` blocks of `length` byte tokens from the built-in corpus, the same for every call."""
    blocks = data_mod.load("builtin", length)
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:n]
    ids = blocks.inputs[pick]
    if vocab < data_mod.BYTE_VOCAB:
        log.info("vocabulary %d < 256 byte values: byte ids are taken modulo %d", vocab, vocab)
        ids = ids % vocab
    return ids


def as_samples(samples: Any, name: str, length: int = LENGTH) -> data_mod.Blocks:
    """The original's lists of 1-D tensors (equal lengths stacked, others padded), or any data."""
    if isinstance(samples, (list, tuple)) and samples and isinstance(samples[0], torch.Tensor):
        rows = [t.reshape(-1).cpu() for t in samples]
        if len({r.numel() for r in rows}) == 1:
            return data_mod.as_blocks(torch.stack(rows), name=name)
        return data_mod.as_blocks([r.tolist() for r in rows], name=name)
    return data_mod.as_blocks(samples, context=length, name=name)


def training_data(
    model: nn.Module, config: Any, train: Any, val: Any, n: int = SAMPLES
) -> tuple[data_mod.Blocks, data_mod.Blocks]:
    """Training and validation blocks: given, or `n` built-in blocks split 80/20 (seeded)."""
    length = context_length(config, model)
    if train is None:
        train = builtin_samples(n, length, model_vocab(model, config, length))
        log.info("no train_data: %d blocks of %d tokens of the built-in corpus", n, length)
    train_b = as_samples(train, "train_data", length)
    if val is not None:
        return train_b, as_samples(val, "val_data", length)
    return data_mod.split(train_b, 0.2, seed=0)


class _Epochs(Callback):
    """Collects step figures and writes one `MetricsTracker` row per epoch's evaluation."""

    def __init__(self, model, train, precision, batch_size, eval_batches, steps_per_epoch,
                 tracker) -> None:  # fmt: skip
        self.model, self.train, self.precision = model, train, precision
        self.batch_size, self.eval_batches = batch_size, eval_batches
        self.steps_per_epoch, self.tracker = steps_per_epoch, tracker
        self.steps: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def on_step_end(self, state: Any, metrics: Any) -> None:
        self.steps.append(dict(metrics))

    def on_eval_end(self, state: Any, metrics: Any) -> None:
        if state.step == 0:  # the evaluation before training
            self.start = time.perf_counter()
            return
        train = evaluate(self.model, self.train, self.precision, self.batch_size,
                         self.eval_batches)  # fmt: skip
        losses = [s["train/loss"] for s in self.steps]
        norms = [s["train/grad_norm"] for s in self.steps if math.isfinite(s["train/grad_norm"])]
        self.tracker.log_epoch(
            epoch=math.ceil(state.step / self.steps_per_epoch) - 1,
            train_metrics={"loss": sum(losses) / len(losses), "accuracy": train["val/accuracy"]},
            val_metrics={"loss": metrics["val/loss"], "accuracy": metrics["val/accuracy"]},
            learning_rate=self.steps[-1]["train/lr"],
            gradient_norm=max(norms, default=math.nan),
            epoch_duration=time.perf_counter() - self.start,
        )
        self.steps, self.start = [], time.perf_counter()


def wandb_sinks(use_wandb: bool, precision: Precision, config: dict[str, Any]) -> list[Any]:
    """A W&B sink into the active run (or a new one) when asked; one warning if impossible."""
    if not use_wandb:
        return []
    if not WANDB_AVAILABLE:
        log.warning("use_wandb=True but wandb is not installed (pip install 'amptrain[wandb]')")
        return []
    import wandb

    from amptrain.metrics.wandb_sink import WandbSink

    return [WandbSink(run=wandb.run, config=config, precision=precision)]


def test_fine_tuning(
    model: nn.Module,
    config: Any,
    train_data: Any = None,
    val_data: Any = None,
    n_epochs: int = 3,
    learning_rate: float = 5e-5,
    batch_size: int = 4,
    use_wandb: bool = False,
    use_amp: bool = False,
    gradient_accumulation_steps: int = 1,
) -> dict[str, Any]:
    """Fine-tune `model` in place for `n_epochs` with `amptrain.fit`; the original's result keys.

    Args:
        model: The model, on the device it trains on.
        config: Any object with `vocab_size` (and optionally `max_seq_len`).
        train_data: A list of 1-D token tensors (or any data `amptrain.fit` takes); None: 50
            blocks of the built-in corpus.
        val_data: The same kinds; None: a seeded 20% of `train_data`.
        n_epochs: Passes over the training blocks.
        learning_rate: Peak learning rate.
        batch_size: Blocks per micro-batch.
        use_wandb: Log to W&B (the active run, else a new one).
        use_amp: fp16 on CUDA, bf16 on a CPU with fast bf16, fp32 otherwise (see `precision`).
        gradient_accumulation_steps: Micro-batches per optimizer step.

    Returns:
        `loss_history`, `grad_norm_history`, `final_loss`, `initial_loss`,
        `training_time_seconds`, `samples_per_second`, `metrics_summary`, `best_epoch`,
        `amp_enabled`, `final_loss_scale`; also `precision`, `precision_reason`, `fit_result`.

    Raises:
        ConfigError, DataError, ModelError: For bad input, before training.
    """
    device = next(model.parameters()).device
    precision = amp_precision(use_amp, device)
    log.info("test_fine_tuning: %s (%s)", precision.name, precision.reason)
    train_b, val_b = training_data(model, config, train_data, val_data)
    steps_per_epoch = len(train_b) // batch_size // gradient_accumulation_steps
    if batch_size < 1 or gradient_accumulation_steps < 1 or steps_per_epoch < 1:
        raise ConfigError(
            f"batch_size={batch_size} x gradient_accumulation_steps="
            f"{gradient_accumulation_steps} needs at least that many training samples per "
            f"optimizer step, and there are {len(train_b)}; lower them or add data"
        )
    eval_batches = math.ceil(len(val_b) / batch_size)
    tracker = MetricsTracker(use_wandb=False)
    epochs = _Epochs(model, train_b, precision, batch_size, eval_batches, steps_per_epoch,
                     tracker)  # fmt: skip
    settings = dict(max_steps=n_epochs * steps_per_epoch, batch_size=batch_size,
                    grad_accum=gradient_accumulation_steps, lr=learning_rate,
                    eval_every=steps_per_epoch, eval_batches=eval_batches, log_every=1)  # fmt: skip
    sinks = wandb_sinks(use_wandb, precision, {"n_epochs": n_epochs, **settings})
    result = fit(model, train_b, val_b, precision=precision, sinks=sinks, callbacks=[epochs],
                 **settings)  # fmt: skip
    model.eval()  # as the original left it
    samples = result.steps * batch_size * gradient_accumulation_steps
    return fine_tuning_dict(result, tracker, samples)


def fine_tuning_dict(result: FitResult, tracker: MetricsTracker, samples: int) -> dict[str, Any]:
    """The original return keys of `test_fine_tuning`, from a `FitResult` and its tracker."""
    steps = [r for r in result.history if "train/loss" in r]
    losses = [r["train/loss"] for r in steps]
    amp = result.precision in ("fp16", "bf16")
    return {
        "loss_history": losses,
        "grad_norm_history": [r["train/grad_norm"] for r in steps],
        "final_loss": losses[-1] if losses else math.nan,
        "initial_loss": losses[0] if losses else math.nan,
        "training_time_seconds": result.train_time_s,
        "samples_per_second": samples / result.train_time_s if result.train_time_s else 0.0,
        "metrics_summary": tracker.get_summary() if PANDAS_AVAILABLE else tracker.metrics_history,
        "best_epoch": tracker.get_best_epoch("val/loss", "min") if tracker.records else None,
        "amp_enabled": amp,
        "final_loss_scale": result.loss_scale if result.precision == "fp16" else None,
        "precision": result.precision,
        "precision_reason": result.reason,
        "fit_result": result,
    }


test_fine_tuning.__test__ = False  # pytest: these test_* functions are the API, not tests
