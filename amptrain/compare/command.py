"""The `compare` command as the CLI runs it: model and data from a config, then the run directory.

`run_compare` builds the configured model and data like `train` does (same-budget mode), or
cuts a held-out text off the end of the data (pretrained mode), calls `compare`, and writes
the report files into a new run directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amptrain.config import TrainConfig
from amptrain.errors import ConfigError
from amptrain.runs import create_run_dir, write_config

if TYPE_CHECKING:
    from amptrain.compare import CompareReport


def run_compare(
    cfg: TrainConfig, args: Any, settings: dict[str, Any] | None = None
) -> tuple[CompareReport, Path]:
    """The `compare` command: build model and data like `train`, compare, write the run.

    Same-budget mode rebuilds the configured model for every seed. Pretrained mode cuts the
    last `--eval-bytes` of the data off as the held-out text, trains the model on the rest for
    `--steps` (0: score it as built), then scores the text with both models.
    """
    # Imported here: both modules import this one (report.py re-exports run_compare for the
    # CLI), so top-level imports would be circular.
    from amptrain.compare import REFERENCES, check_baseline_dir, compare
    from amptrain.compare.report import write_report

    seeds = _seeds(args.seeds)
    common = dict(
        steps=args.steps, precision=cfg.precision, memory=not args.no_memory,
        name=None if cfg.model == "tiny-gpt" else cfg.model,
        make_sinks=None if args.no_progress else _progress, **_fit_options(cfg),
    )  # fmt: skip
    if args.baseline in REFERENCES:
        from amptrain.run_setup import prepare

        model, train, val, _ = prepare(cfg)
        report = compare(_model_factory(cfg, model), args.baseline, train=train, val=val,
                         seeds=seeds, reference_layers=args.reference_layers, **common)  # fmt: skip
    else:
        check_baseline_dir(args.baseline)  # before the data is read
        model, train, val, text, tokenizer = _held_out(cfg, args.eval_bytes)
        report = compare(model, args.baseline, train=train, val=val, text=text, seeds=seeds[:1],
                         tokenizer=tokenizer, context=cfg.context,
                         latency_iters=args.latency_iters, **common)  # fmt: skip
    run_dir = create_run_dir(cfg.out, "compare")
    write_config(run_dir, "compare", cfg, settings)
    return report, write_report(report, run_dir)


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2"
        ) from None


def _fit_options(cfg: TrainConfig) -> dict[str, Any]:
    """The loop settings compare passes on; steps, seeds and evaluation it sets itself."""
    fixed = ("max_steps", "seed", "eval_every")
    return {k: v for k, v in dataclasses.asdict(cfg.fit).items() if k not in fixed}


def _progress(what: str, total: int) -> list[Any]:
    from amptrain.metrics.console import ProgressSink

    return [ProgressSink(total, f"compare: {what}")]


def _model_factory(cfg: TrainConfig, model: Any) -> Any:
    """Build the configured model afresh (the caller seeds it), on the device `prepare` chose."""
    from amptrain.run_setup import model_factory

    return model_factory(cfg, next(model.parameters()).device)


def _held_out(cfg: TrainConfig, eval_bytes: int) -> tuple[Any, Any, Any, str, Any]:
    """Model, train/val blocks of the data minus its last `eval_bytes`, that text, tokenizer."""
    import torch

    from amptrain import data
    from amptrain.run_setup import model_factory, pick_device, tokenizer_for

    device = pick_device(cfg.device)
    text = data.read_text(cfg.data, cfg.text_field)
    raw = text.encode("utf-8")
    if not 0 < eval_bytes <= len(raw) // 2:
        raise ConfigError(
            f"--eval-bytes {eval_bytes} is invalid: it must be in [1, {len(raw) // 2}] (half of "
            f"the {len(raw):,} bytes of {cfg.data}; the rest trains the model)"
        )
    held_out = raw[-eval_bytes:].decode("utf-8", errors="ignore")  # a suffix of whole characters
    tokenizer = tokenizer_for(cfg)
    ids = torch.tensor(tokenizer.encode(text[: len(text) - len(held_out)]), dtype=torch.long)
    blocks = data.pack(ids, cfg.context, f"{cfg.data} without its last {eval_bytes} bytes")
    train, val = data.split(blocks, cfg.val_fraction, cfg.fit.seed)
    torch.manual_seed(cfg.fit.seed)
    model = model_factory(cfg, device)()
    return model, train, val, held_out, tokenizer
