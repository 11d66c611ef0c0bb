"""The measuring tier-3 functions: AMP benchmark, hyperparameter search, baseline comparison.

`test_amp_speedup_benchmark` maps onto `amptrain.bench.bench`, `test_hyperparameter_search`
onto `amptrain.search.search`, `test_benchmark_comparison` onto `amptrain.compare.compare`,
each returning the original keys (plus the amptrain record under an extra key). The list of
behaviour changes is in `amptrain.compat`; what is specific to each function is in its
docstring.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from amptrain.errors import ConfigError, DataError


def _arm_dict(arm: Any, steps: int) -> dict[str, Any]:
    """One benchmark arm in the shape of the original's per-run result."""
    ok = arm.status == "ok"
    return {
        "precision": arm.precision,
        "precision_reason": arm.reason,
        "status": arm.status,
        "error": arm.error,
        "amp_enabled": arm.precision in ("fp16", "bf16"),
        "loss_history": list(arm.loss_curve),
        "initial_loss": arm.loss_curve[0] if arm.loss_curve else None,
        "final_loss": arm.train_loss,
        "training_time_seconds": arm.step_ms * steps / 1000 if ok else None,
        "val_loss": arm.val_loss,
        "val_accuracy": arm.val_accuracy,
        "peak_memory_mb": arm.mem_mb,
        "final_loss_scale": arm.loss_scale if arm.precision == "fp16" else None,
    }


def test_amp_speedup_benchmark(
    model: nn.Module,
    config: Any,
    train_data: Any = None,
    n_epochs: int = 3,
    learning_rate: float = 5e-5,
    batch_size: int = 4,
    use_wandb: bool = False,
) -> dict[str, Any]:
    """fp32 against AMP (fp16 on CUDA, bf16 on CPU) with `amptrain.bench`; the original keys.

    Both arms start from the model's weights (it is not modified), see the same batches, and
    run 3 interleaved repeats with 5 untimed warm-up steps; times are median step time x
    steps; memory is each arm's own increment (CUDA allocator, or the peak RSS of a forked
    worker on CPU). `fp16_results` holds the AMP arm whatever its precision (`amp_precision`).

    Returns:
        `fp32_results`, `fp16_results`, `speedup`, `memory_reduction_percent`,
        `accuracy_difference`, `loss_difference`, `fp32_time_seconds`, `fp16_time_seconds`,
        `fp32_memory_mb`, `fp16_memory_mb`, `requirements_met`; also `amp_precision`,
        `verdict` and `report` (the `BenchReport`). Figures of a failed arm are None.
    """
    from amptrain.bench import bench
    from amptrain.compat import training_data, wandb_sinks
    from amptrain.precision import resolve

    device = next(model.parameters()).device
    amp = "fp16" if device.type == "cuda" else "bf16"
    train_b, val_b = training_data(model, config, train_data, None)
    steps = max(2, n_epochs * (len(train_b) // batch_size))
    report = bench(model, train_b, val_b, precisions=[amp], steps=steps, warmup=min(5, steps - 2),
                   batch_size=batch_size, lr=learning_rate,
                   eval_batches=math.ceil(len(val_b) / batch_size))  # fmt: skip
    out = benchmark_dict(report, amp, steps)
    for sink in wandb_sinks(use_wandb, resolve(amp, device), {"benchmark_steps": steps}):
        summary = {k: v for k, v in out.items() if isinstance(v, (int, float))}
        sink.log_summary({f"amp_benchmark/{k}": v for k, v in summary.items()})
        sink.close()
    return out


def benchmark_dict(report: Any, amp: str, steps: int) -> dict[str, Any]:
    """The original keys of `test_amp_speedup_benchmark` from a `BenchReport`."""
    ref, low = report.arm("fp32"), report.arm(amp)
    both = ref.status == low.status == "ok"
    saved = low.mem_reduction_vs_fp32 if both else None
    mem = None if saved is None else saved * 100
    out = {
        "fp32_results": _arm_dict(ref, steps),
        "fp16_results": _arm_dict(low, steps),
        "speedup": low.speedup_vs_fp32,
        "memory_reduction_percent": mem,
        "accuracy_difference": abs(low.val_accuracy_diff) if both else None,
        "loss_difference": abs(low.val_loss - ref.val_loss) if both else None,
        "fp32_time_seconds": _arm_dict(ref, steps)["training_time_seconds"],
        "fp16_time_seconds": _arm_dict(low, steps)["training_time_seconds"],
        "fp32_memory_mb": ref.mem_mb,
        "fp16_memory_mb": low.mem_mb,
    }
    out["requirements_met"] = {
        "speedup_1.5x": None if out["speedup"] is None else out["speedup"] >= 1.5,
        "memory_reduction_30pct": None if mem is None else mem >= 30,
        "memory_reduction_40pct": None if mem is None else mem >= 40,
        "accuracy_stable": None if not both else out["accuracy_difference"] < 0.01,
    }
    return {**out, "amp_precision": amp, "verdict": report.verdict, "report": report}


# The original's custom search-space keys -> amptrain's, and amptrain's -> reported names.
_SPACE_KEYS = {"lr": "lr", "batch_size": "batch_size", "warmup": "warmup", "wd": "weight_decay",
               "precision": "precision"}  # fmt: skip
_REPORTED = {"lr": "learning_rate", "warmup": "warmup_steps"}
DEFAULT_SPACE = {"lr": (1e-5, 1e-3), "batch_size": [2, 4, 8], "warmup": (0, 10), "wd": (1e-6, 1e-2)}
SEARCH_SAMPLES = 30  # the original's default data for the search
ROLES = ("custom", "baseline")  # the two scores of a pretrained CompareReport


def map_space(given: dict[str, Any] | None, ref_steps: int) -> dict[str, Any]:
    """The original custom space (`lr`, `batch_size`, `warmup` in steps, `wd`) as amptrain's.

    Missing keys take the original defaults; `warmup` steps become a fraction of `ref_steps`
    (the steps of a trial at batch size 4), at most half of them.

    Raises:
        ConfigError: For an unknown key or a range that is not `(low, high)`.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(_SPACE_KEYS))
    if unknown:
        raise ConfigError(f"search_space keys {unknown} are unknown; valid: {sorted(_SPACE_KEYS)}")
    spec = {**DEFAULT_SPACE, **given}
    try:
        (lr_low, lr_high), (w_low, w_high), (wd_low, wd_high) = (
            spec["lr"], spec["warmup"], spec["wd"]
        )  # fmt: skip
    except (TypeError, ValueError):
        raise ConfigError(
            f"search_space ranges must be (low, high) pairs; got lr={spec['lr']!r}, "
            f"warmup={spec['warmup']!r}, wd={spec['wd']!r}"
        ) from None
    w_low, w_high = min(w_low / ref_steps, 0.5), min(w_high / ref_steps, 0.5)
    space = {
        "lr": {"low": lr_low, "high": lr_high, "log": True},
        "batch_size": list(spec["batch_size"]),
        "warmup": {"low": w_low, "high": w_high} if w_low < w_high else w_low,
        "weight_decay": {"low": wd_low, "high": wd_high, "log": wd_low > 0},
    }
    if "precision" in given:
        space["precision"] = list(given["precision"])
    return space


def _reported(params: dict[str, Any] | None, ref_steps: int) -> dict[str, Any] | None:
    if params is None:
        return None
    out = {_REPORTED.get(k, k): v for k, v in params.items()}
    if "warmup_steps" in out:
        out["warmup_steps"] = round(out["warmup_steps"] * ref_steps)
    return out


def test_hyperparameter_search(
    model_factory: Any,
    config: Any,
    train_data: Any = None,
    n_trials: int = 10,
    search_space: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Search lr, batch size, warm-up and weight decay with `amptrain.search`; the original keys.

    Every trial trains a fresh model from `model_factory` on the same tokens (two passes over
    the training blocks, whatever the batch size), and is scored on the validation loss of a
    seeded 20% split, not the mean training loss; unpromising trials are pruned; a failing
    trial does not stop the study; the sampler is seeded; warm-up is applied. The precision
    is `auto` (say `search_space={"precision": [...]}` to search it). Needs optuna.

    Returns:
        `best_params` (`learning_rate`, `batch_size`, `warmup_steps`, `weight_decay`),
        `best_value` (validation loss), `n_trials`, `all_trials` (`{number, value, params}`);
        also `search_result` (the `SearchResult`).
    """
    from amptrain.compat import training_data
    from amptrain.search import search

    probe = model_factory()
    train_b, val_b = training_data(probe, config, train_data, None, n=SEARCH_SAMPLES)
    del probe
    tokens = 2 * len(train_b) * (train_b.context - 1)  # the original's two epochs
    ref_steps = max(1, 2 * len(train_b) // 4)
    result = search(model_factory, train_b, val_b, map_space(search_space, ref_steps), n_trials,
                    tokens=tokens, seed=0, baseline=False, precision="auto",
                    batch_size=4)  # fmt: skip
    trials = [{**t, "params": _reported(t["params"], ref_steps)} for t in result.all_trials]
    return {
        "best_params": _reported(result.best_params, ref_steps),
        "best_value": result.best_value,
        "n_trials": result.n_trials,
        "all_trials": trials,
        "search_result": result,
    }


class _Bytes:
    """UTF-8 bytes as tokens, taken modulo a vocabulary smaller than 256."""

    def __init__(self, vocab: int) -> None:
        self.vocab_size = min(vocab, 256)
        self.name = "bytes" if vocab >= 256 else f"bytes mod {vocab}"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return [b % self.vocab_size for b in text.encode("utf-8")]


def baseline_dir(name: str) -> Path:
    """A local model directory, or the Hugging Face cache's copy; amptrain never downloads.

    Raises:
        FileNotFoundError: With the command that fetches it once, and the offline choices.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from amptrain._imports import TRANSFORMERS_AVAILABLE

    if TRANSFORMERS_AVAILABLE:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:  # not cached (or not a repo name): fall through to the hint
            pass
    raise FileNotFoundError(
        f"baseline_model_name={name!r} is neither a local directory nor in the Hugging Face "
        f"cache, and amptrain does not download; fetch it once with `huggingface-cli download "
        f"{name} --local-dir {path.name}` and pass that directory, or use 'gpt2' or 'tiny-gpt' "
        "for a same-size reference trained on the same budget"
    )


def _test_text(test_data: Any, n_samples: int) -> str:
    """The held-out text both models score: given text, byte-valued ids, or built-in text."""
    from amptrain.compat import LENGTH, builtin_samples

    if test_data is None:
        rows = builtin_samples(n_samples, LENGTH, 256, seed=1).tolist()
    elif isinstance(test_data, str):
        return test_data
    elif all(isinstance(t, str) for t in test_data):
        return "\n".join(list(test_data)[:n_samples])
    else:
        rows = [[int(i) for i in t.reshape(-1).tolist()] for t in list(test_data)[:n_samples]]
        if any(not 0 <= i < 256 for row in rows for i in row):
            raise DataError(
                "test_data holds token ids beyond bytes; a pretrained baseline reads text "
                "through its own tokenizer, so pass test_data as text (a str or list of str)"
            )
    return "\n".join(bytes(row).decode("utf-8", errors="replace") for row in rows)


def _pair(custom: float | None, baseline: float | None, key: str, invert: bool = False) -> dict:
    ok = custom is not None and baseline is not None and (baseline if invert else custom)
    ratio = (baseline / custom if invert else custom / baseline) if ok else None
    return {"custom": custom, "baseline": baseline, key: ratio}


def test_benchmark_comparison(
    model: nn.Module,
    config: Any,
    baseline_model_name: str = "distilgpt2",
    test_data: Any = None,
    n_samples: int = 20,
) -> dict[str, Any]:
    """Compare the model with a baseline through `amptrain.compare`; the original keys.

    A local Hugging Face model directory (or a hub name already in the local cache) is a
    pretrained baseline: both models score the same held-out text (`test_data`, else
    `n_samples` x 32 bytes of the built-in corpus), each through its own tokenizer (bytes for
    the custom model), so `perplexity` is per byte (2 ** bits per byte), comparable across
    tokenizers; `inference_speed_ms` is milliseconds per kB of text. `tiny-gpt` or `gpt2`
    trains a same-size reference next to a copy of the model on the same budget (3 seeds) and
    reports mean validation perplexities; inference speed is not measured then. The model
    itself is not changed; memory is measured (`memory_mb`).

    Returns:
        `parameter_count` {custom, baseline, ratio}, `inference_speed_ms` {custom, baseline,
        speedup}, `perplexity` {custom, baseline, ratio}, `baseline_model`; also
        `bits_per_byte`, `memory_mb`, `verdict` and `report` (the `CompareReport`).
    """
    from amptrain.compare import REFERENCES, compare
    from amptrain.compat import context_length, model_vocab, training_data

    vocab = model_vocab(model, config, context_length(config, model))
    if baseline_model_name in REFERENCES:
        train_b, val_b = training_data(model, config, None, test_data)
        report = compare(model, baseline_model_name, train=train_b, val=val_b, batch_size=4,
                         eval_batches=math.ceil(len(val_b) / 4))  # fmt: skip
        ppl = report.stat("val_perplexity")
        perplexity = _pair(ppl.custom_mean, ppl.reference_mean, "ratio")
        speed, bpb = _pair(None, None, "speedup"), _pair(None, None, "ratio")
    else:
        text = _test_text(test_data, n_samples)
        context = context_length(config, model)
        report = compare(model, baseline_dir(baseline_model_name), text=text,
                         tokenizer=_Bytes(vocab), context=context)  # fmt: skip
        custom, base = (next(s for s in report.scores if s.role == r) for r in ROLES)
        perplexity = _pair(2**custom.bits_per_byte, 2**base.bits_per_byte, "ratio")
        speed = _pair(custom.latency_ms_per_kb, base.latency_ms_per_kb, "speedup", invert=True)
        bpb = _pair(custom.bits_per_byte, base.bits_per_byte, "ratio")
    custom_info = report.model("custom")
    base_info = next(m for m in report.models if m.role != "custom")  # reference or baseline
    return {
        "parameter_count": _pair(custom_info.parameters, base_info.parameters, "ratio"),
        "inference_speed_ms": speed,
        "perplexity": perplexity,
        "baseline_model": baseline_model_name,
        "bits_per_byte": bpb,
        "memory_mb": _pair(custom_info.mem_mb, base_info.mem_mb, "ratio"),
        "verdict": report.verdict,
        "report": report,
    }


# pytest would collect these API functions wherever a test module imports them.
for _api in (test_amp_speedup_benchmark, test_hyperparameter_search, test_benchmark_comparison):
    _api.__test__ = False
