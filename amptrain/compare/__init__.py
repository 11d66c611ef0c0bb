"""`amptrain compare`: is my architecture any good? Baselines on equal terms, with statistics.

Same-budget mode trains a standard decoder-only transformer of about the custom model's size
(the built-in TinyGPT, or GPT-2 through transformers) next to the custom model: the same
batches, steps, learning-rate schedule and precision, over several seeds; the report gives
mean ± sd per model and a paired t-test of the per-seed differences. Pretrained mode scores one
held-out text with the custom model and a local Hugging Face causal LM, each through its own
tokenizer, in bits per byte: nats summed over the text / (ln 2 x UTF-8 bytes), a figure that
does not depend on the vocabulary, unlike perplexity.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amptrain import hardware
from amptrain.adapter import (
    IGNORE_INDEX,
    check_token_range,
    probe_vocab,
)
from amptrain.compare.report import BUDGET_METHOD, TEXT_METHOD, budget_verdict, text_verdict
from amptrain.compare.stats import MetricStats, paired_stats
from amptrain.compare.text import (
    MAX_WINDOW,
    REFERENCES,
    check_baseline_dir,
    encode,
    latency_ms,
    load_baseline,
    score_tokens,
    scoring_window,
    text_windows,
    tokenizer_name,
)
from amptrain.config import COMPARE_STEPS as DEFAULT_STEPS
from amptrain.config import FitOptions
from amptrain.data import ByteTokenizer
from amptrain.errors import ConfigError, DataError, ModelError
from amptrain.loop import check_data, evaluate, fit
from amptrain.models import GPTConfig, TinyGPT
from amptrain.precision import Precision, resolve

log = logging.getLogger("amptrain")

__all__ = [
    "MAX_WINDOW", "REFERENCES", "CompareReport", "ModelInfo", "SeedRecord", "Shape",
    "TextScore", "check_baseline_dir", "compare", "gpt_parameters", "load_baseline",
    "score_tokens", "size_reference", "text_windows",
]  # fmt: skip

METRICS = (("val_loss", True), ("val_perplexity", True), ("val_accuracy", False),
           ("tokens_per_s", False))  # fmt: skip
Factory = Callable[[], nn.Module]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A compared model: its size and memory."""

    role: str  # "custom", "reference" (same-budget) or "baseline" (pretrained)
    name: str
    parameters: int
    weights_mb: float
    mem_mb: float | None = None
    """Peak memory increment of a short training run (same-budget) or of scoring (pretrained)."""
    mem_source: str | None = None


@dataclasses.dataclass(frozen=True)
class SeedRecord:
    """One training run of one model with one seed (initial weights and batch order)."""

    seed: int
    role: str
    val_loss: float
    val_perplexity: float
    val_accuracy: float
    train_loss: float
    tokens_per_s: float
    train_time_s: float
    steps: int
    skipped_steps: int


@dataclasses.dataclass(frozen=True)
class TextScore:
    """One model's score of the held-out text, through its own tokenizer."""

    role: str
    name: str
    tokenizer: str
    bits_per_byte: float
    nats: float
    """Summed next-token cross-entropy over the scored tokens."""
    tokens: int
    scored_tokens: int
    """Every token but the first, which has no context to be predicted from."""
    bytes: int
    window: int
    latency_ms: float
    latency_ms_per_kb: float


@dataclasses.dataclass(frozen=True)
class CompareReport:
    """The comparison: models, per-seed runs and statistics, or text scores, and a verdict."""

    mode: str  # "same-budget" or "pretrained"
    models: tuple[ModelInfo, ...]
    runs: tuple[SeedRecord, ...] = ()
    stats: tuple[MetricStats, ...] = ()
    scores: tuple[TextScore, ...] = ()
    verdict: str = ""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)

    def model(self, role: str) -> ModelInfo:
        """The compared model with this role."""
        return next(m for m in self.models if m.role == role)

    def stat(self, metric: str) -> MetricStats:
        """The statistics of one metric (same-budget mode)."""
        return next(s for s in self.stats if s.metric == metric)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Shape:
    """Depth and width of a GPT-style reference, and its exact parameter count."""

    n_layer: int
    n_embd: int
    n_head: int
    parameters: int


def gpt_parameters(vocab: int, context: int, n_layer: int, n_embd: int) -> int:
    """Parameters of a TinyGPT or GPT-2 (tied embeddings; both have the same count)."""
    d = n_embd
    return vocab * d + context * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def _heads(width: int) -> int:
    """The head count whose head size is closest to GPT-2's 64."""
    return min(
        (h for h in range(1, width + 1) if width % h == 0), key=lambda h: abs(width / h - 64)
    )


def size_reference(target: int, vocab: int, context: int, layers: int | None = None) -> Shape:
    """The GPT shape closest to `target` parameters.

    Widths are multiples of 8 (of 2 below 32). With `layers` fixed, the closest width wins;
    otherwise, among the shapes within 5% of the target, the one whose width/depth ratio is
    closest to 64 (GPT-2 small's) wins, else simply the closest.
    """
    candidates = []
    for n_layer in [layers] if layers else range(1, 49):
        a, b = 12 * n_layer, 13 * n_layer + vocab + context + 2
        root = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
        step = 8 if root >= 32 else 2
        for width in {max(step, step * math.floor(root / step)), step * math.ceil(root / step)}:
            params = gpt_parameters(vocab, context, n_layer, width)
            candidates.append(Shape(n_layer, width, _heads(width), params))
    close = [s for s in candidates if abs(s.parameters / target - 1) <= 0.05]
    if close and layers is None:
        return min(close, key=lambda s: abs(math.log(s.n_embd / s.n_layer / 64)))
    return min(candidates, key=lambda s: (abs(s.parameters - target), s.n_layer))


def compare(
    model: nn.Module | Factory,
    baseline: str | Path | nn.Module | Factory = "tiny-gpt",
    *,
    train: object | None = None,
    val: object | None = None,
    text: str | None = None,
    tokenizer: Any = None,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = DEFAULT_STEPS,
    precision: str = "auto",
    reference_layers: int | None = None,
    context: int | None = None,
    name: str | None = None,
    memory: bool = True,
    latency_iters: int = 10,
    alpha: float = 0.05,
    make_sinks: Callable[[str, int], Sequence[Any]] | None = None,
    **options: Any,
) -> CompareReport:
    """Compare a model with a same-size reference (same budget) or a pretrained baseline.

    Args:
        model: The custom model, or a zero-argument factory called under `torch.manual_seed(s)`
            for every seed s (a module starts every seed from its current weights).
        baseline: `tiny-gpt` or `gpt2` (a reference sized to the model's parameter count), a
            module or factory used as the reference, or a local Hugging Face model directory,
            which selects pretrained mode.
        train: Training blocks (same-budget; pretrained: optional, trains `model` in place first).
        val: Validation blocks; every run is scored on the same `eval_batches` batches.
        text: Pretrained mode: the held-out text both models score.
        tokenizer: Pretrained mode: the custom model's tokenizer (`.encode(text)`); bytes if None.
        seeds: Same-budget: at least 3 seeds; each gives both models the same batch order.
        steps: Optimizer steps per training run: the budget.
        precision: One precision for every run and score (`auto` resolves once).
        reference_layers: Depth of a `tiny-gpt`/`gpt2` reference; default: searched, and twice
            the depth of a TinyGPT custom model, so the reference is not a copy of it.
        context: Scoring window of a custom model whose config does not say (pretrained).
        name: How to call the custom model in the report.
        memory: Measure each model's peak memory (a forked worker on CPU).
        latency_iters: Pretrained: timed forwards per model, after 3 warm-up forwards.
        alpha: Significance level of the paired t-test and its interval.
        make_sinks: `(description, steps) -> sinks` for every training run (progress bars).
        **options: Other `FitOptions` fields: `batch_size`, `lr`, `eval_batches`, `warmup`...

    Returns:
        A `CompareReport`.

    Raises:
        ConfigError, DataError, ModelError, FileNotFoundError: For bad input, before training.
    """
    fixed = sorted(set(options) & {"max_steps", "seed", "eval_every"})
    if fixed:
        raise ConfigError(f"compare sets {fixed} itself: pass steps= and seeds= instead")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha} must be in (0, 1)")
    FitOptions(max_steps=steps, **options)  # refuse bad options before any work
    first_seed = int(next(iter(seeds), 0))  # pretrained mode trains once, with this seed
    run = _Settings(steps, precision, memory, alpha, make_sinks, options, first_seed)
    if isinstance(baseline, (str, Path)) and str(baseline) not in REFERENCES:
        return _pretrained(model, Path(baseline), train, val, text, tokenizer, context, name,
                           latency_iters, run)  # fmt: skip
    return _same_budget(model, baseline, train, val, seeds, reference_layers, name, run)


@dataclasses.dataclass(frozen=True)
class _Settings:
    steps: int
    precision: str
    memory: bool
    alpha: float
    make_sinks: Callable[[str, int], Sequence[Any]] | None
    options: dict[str, Any]
    seed: int = 0

    def fit(self, model: nn.Module, train: Any, val: Any, what: str, seed: int | None = None):
        """`amptrain.fit` on the comparison's budget, then one evaluation on `val` (if given).

        Returns the `FitResult` and the validation metrics (empty without `val`).
        """
        sinks = self.make_sinks(what, self.steps) if self.make_sinks else ()
        seed = self.seed if seed is None else seed
        # fit() would also evaluate at step 0; only the end counts here, so evaluate once after.
        result = fit(model, train, None, precision=self.precision, sinks=sinks, seed=seed,
                     max_steps=self.steps, **self.options)  # fmt: skip
        if val is None:
            return result, {}
        opts = FitOptions(max_steps=self.steps, **self.options)
        prec = resolve(self.precision, next(model.parameters()).device)
        metrics = evaluate(model, val, prec, opts.batch_size, opts.eval_batches, opts.ignore_index)
        return result, metrics


def _factory(obj: nn.Module | Factory, device: torch.device | None = None) -> Factory:
    if isinstance(obj, nn.Module):
        return lambda: copy.deepcopy(obj)
    if not callable(obj):
        raise ModelError(f"expected an nn.Module or a factory of one, got {type(obj).__name__}")
    return obj if device is None else lambda: obj().to(device)


def _describe(model: nn.Module) -> str:
    if isinstance(model, TinyGPT):
        c = model.config
        return f"tiny-gpt {c.n_layer}x{c.n_embd} ({c.n_head} heads)"
    return type(model).__name__


def _info(
    role: str, name: str, model: nn.Module, mem: tuple[float | None, str | None]
) -> ModelInfo:
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params) / 2**20
    return ModelInfo(role, name, n, weights, *mem)


def _reference(baseline: Any, custom: nn.Module, vocab: int, context: int, layers: int | None):
    """The reference's factory and name."""
    if not isinstance(baseline, str):
        return _factory(baseline), getattr(baseline, "__name__", None) or type(baseline).__name__
    if layers is None and isinstance(custom, TinyGPT):
        layers = 2 * custom.config.n_layer  # the same shape would be a copy of the custom model
    target = sum(p.numel() for p in custom.parameters())
    shape = size_reference(target, vocab, context, layers)
    name = f"{baseline} {shape.n_layer}x{shape.n_embd} ({shape.n_head} heads)"
    if baseline == "gpt2":
        return lambda: _gpt2(shape, vocab, context), name
    cfg = GPTConfig(vocab_size=vocab, n_layer=shape.n_layer, n_embd=shape.n_embd,
                    n_head=shape.n_head, block_size=context)  # fmt: skip
    return lambda: TinyGPT(cfg), name


def _gpt2(shape: Shape, vocab: int, context: int) -> nn.Module:
    from amptrain._imports import requires

    requires("transformers", "hf", "the gpt2 reference", "use --baseline tiny-gpt")
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab, n_positions=context, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)  # dropout 0, like tiny-gpt's default


def _same_budget(model, baseline, train, val, seeds, layers, name, run: _Settings) -> CompareReport:
    seeds = _check_seeds(seeds)
    if run.steps < 1 or train is None or val is None:
        raise ConfigError("same-budget mode needs train=, val= and steps >= 1 to train both models")
    torch.manual_seed(seeds[0])
    custom = _factory(model)()
    device = next(custom.parameters()).device
    ignore = run.options.get("ignore_index", IGNORE_INDEX)
    train_b, val_b = check_data(custom, train, val, device, "the custom model", ignore)
    resolve(run.precision, device)  # refuse a precision the device cannot serve, before work
    vocab = probe_vocab(custom, train_b.context, device, "the custom model")
    make_ref, ref_name = _reference(baseline, custom, vocab, train_b.context, layers)
    arms = {"custom": _factory(model, device), "reference": _factory(make_ref, device)}
    reference = arms["reference"]()
    check_data(reference, train_b, val_b, device, f"the reference {ref_name}", ignore)
    records = _train_all(arms, seeds, train_b, val_b, run)
    labels = {"custom": name or _describe(custom), "reference": ref_name}
    models = tuple(
        _info(role, labels[role], m, _train_memory(arms[role], train_b, run, device))
        for role, m in (("custom", custom), ("reference", reference))
    )
    stats = tuple(
        paired_stats(metric, *([getattr(r, metric) for r in records if r.role == role]
                               for role in arms), lower, run.alpha)
        for metric, lower in METRICS
    )  # fmt: skip
    settings = {**_settings(run, device), "seeds": seeds, "context": train_b.context,
                "method": list(BUDGET_METHOD)}  # fmt: skip
    verdict = budget_verdict(stats[0], models, len(seeds), run.alpha)
    return CompareReport("same-budget", models, tuple(records), stats, (), verdict, settings,
                         _environment(device))  # fmt: skip


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) < 3 or len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise ConfigError(
            f"seeds={seeds} is invalid: the paired test needs at least 3 distinct seeds >= 0 "
            "(with 2 it has one degree of freedom); e.g. --seeds 0,1,2"
        )
    return seeds


def _train_all(arms: dict[str, Factory], seeds: list[int], train_b, val_b, run) -> list:
    """Every model with every seed; the order alternates per seed so drift hits both alike."""
    records = []
    for i, seed in enumerate(seeds):
        for role in list(arms) if i % 2 == 0 else list(arms)[::-1]:
            log.info("compare: seed %d (%d/%d), %s", seed, i + 1, len(seeds), role)
            torch.manual_seed(seed)  # the factory's initial weights
            r, val = run.fit(arms[role](), train_b, val_b, f"{role}, seed {seed}", seed)
            records.append(SeedRecord(
                seed, role, val["val/loss"], val["val/perplexity"], val["val/accuracy"],
                r.final_train_loss, r.tokens_per_s, r.train_time_s, r.steps, r.skipped_steps,
            ))  # fmt: skip
    return sorted(records, key=lambda r: (seeds.index(r.seed), r.role))


def _pretrained(
    model, path, train, val, text, tokenizer, context, name, iters, run
) -> CompareReport:
    if not isinstance(model, nn.Module):
        raise ModelError("pretrained mode scores one model: pass the nn.Module, not a factory")
    base_model, base_tok = load_baseline(path)
    if not isinstance(text, str) or len(text.encode("utf-8")) < 2:
        raise DataError("pretrained mode needs text=: the held-out text both models score")
    device = next(model.parameters()).device
    prec = resolve(run.precision, device)
    sides = {
        "custom": _Side(model, tokenizer or ByteTokenizer(), name or _describe(model), context),
        "baseline": _Side(base_model.to(device), base_tok, str(path), None),
    }
    for role, side in sides.items():  # refuse mismatched tokenizers before training
        side.prepare(text, device, role)
    trained = {}
    if train is not None and run.steps > 0:
        r, metrics = run.fit(model, train, val, "custom, before scoring")
        trained = {"custom_trained_steps": r.steps, "custom_val_loss": metrics.get("val/loss")}
    n_bytes = len(text.encode("utf-8"))
    scores = tuple(side.score(role, n_bytes, prec, iters) for role, side in sides.items())
    models = tuple(
        _info(role, side.name, side.model, _score_memory(side, prec, run, device))
        for role, side in sides.items()
    )
    settings = {**_settings(run, device), "bytes": n_bytes, "method": list(TEXT_METHOD), **trained}
    return CompareReport("pretrained", models, (), (), scores, text_verdict(scores), settings,
                         _environment(device))  # fmt: skip


@dataclasses.dataclass
class _Side:
    """One model of pretrained mode with its tokenizer, token ids and scoring window."""

    model: nn.Module
    tokenizer: Any
    name: str
    context: int | None
    ids: torch.Tensor | None = None
    window: int = 0

    def prepare(self, text: str, device: torch.device, role: str) -> None:
        self.ids = encode(self.tokenizer, text)
        if self.ids.numel() < 2:
            raise DataError(f"the text is {self.ids.numel()} {role} token(s); need at least 2")
        self.window = min(scoring_window(self.model, self.context), self.ids.numel())
        vocab = probe_vocab(self.model, self.window, device, f"the {role} model {self.name}")
        check_token_range(self.ids, vocab, f"the text in {role} tokens")

    def score(self, role: str, n_bytes: int, prec: Precision, iters: int) -> TextScore:
        nats, scored = score_tokens(self.model, self.ids, self.window, prec)
        device = next(self.model.parameters()).device
        latency = latency_ms(self.model, self.ids[: self.window][None].to(device), prec, iters)
        window_kb = self.window * n_bytes / self.ids.numel() / 1000
        return TextScore(role, self.name, tokenizer_name(self.tokenizer),
                         nats / (math.log(2) * n_bytes), nats, self.ids.numel(), scored, n_bytes,
                         self.window, latency, latency / window_kb)  # fmt: skip


def _train_memory(factory: Factory, train_b, run: _Settings, device) -> tuple[float | None, str]:
    if not run.memory:
        return None, None
    short = dataclasses.replace(run, steps=min(run.steps, 4), make_sinks=None)
    return _peak_mb(device, lambda: short.fit(factory(), train_b, None, "memory"))


def _score_memory(side: _Side, prec: Precision, run: _Settings, device) -> tuple[float | None, str]:
    if not run.memory:
        return None, None
    ids = side.ids[: side.window * 5]  # enough for one full batch of overlapping windows
    return _peak_mb(device, lambda: score_tokens(side.model, ids, side.window, prec))


def _peak_mb(device: torch.device, work: Callable[[], object]) -> tuple[float | None, str]:
    """Peak memory increment of `work`, measured in isolation (see `hardware.measure_memory`)."""
    try:
        _, delta, source = hardware.measure_memory(device, work)
    except Exception as exc:  # memory is a side figure: report it missing, keep the comparison
        log.warning("compare: memory not measured: %s", exc)
        return None, f"not measured: {exc}"
    return delta, source


def _settings(run: _Settings, device: torch.device) -> dict[str, Any]:
    opts = FitOptions(max_steps=max(run.steps, 1), **run.options)
    return {"steps": run.steps, "precision": resolve(run.precision, device).name,
            "precision_reason": resolve(run.precision, device).reason,
            "batch_size": opts.batch_size, "lr": opts.lr, "eval_batches": opts.eval_batches,
            "alpha": run.alpha}  # fmt: skip


def _environment(device: torch.device) -> dict[str, Any]:
    from amptrain.runs import environment

    return {**environment(), "device": str(device)}
