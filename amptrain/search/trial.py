"""One search trial: sampled settings, a fresh model trained under the budget, and pruning.

Intermediate values go to the pruner; unstable runs are ended with the reason stored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
from typing import TYPE_CHECKING, Any

from amptrain.callbacks import Callback
from amptrain.errors import NonFiniteError
from amptrain.search import space as search_space

REPORTS = 4  # evaluations per trial reported to the pruner, at 1/4, 2/4, 3/4 and 4/4 of the budget
SKIP_STORM = 0.25  # stop a trial once more than this fraction of its steps were skipped
SCALE_FLOOR = 1.0  # ... or once the fp16 loss scale fell below this (1.0 for other precisions)
INTERRUPTED = "interrupted"

if TYPE_CHECKING:
    from amptrain.search import SearchJob

log = logging.getLogger("amptrain")


def run_trial(trial: Any, job: SearchJob) -> float | tuple[float, ...]:
    """Train one sampled configuration; return its objective values, or prune or fail it."""
    import optuna

    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    watch = _Watch(trial, prune=len(job.objectives) == 1)
    values: tuple[float, ...] | None = None
    try:
        result = _train(trial, job, watch)
    except NonFiniteError as exc:
        watch.reason = f"unstable: {exc}"
    except KeyboardInterrupt:
        trial.set_user_attr("reason", f"{INTERRUPTED}: KeyboardInterrupt")
        raise
    except Exception as exc:
        trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}"[:500])
        raise
    else:
        trial.set_user_attr("metrics", _metrics(result))
        figures = {"val_loss": result.final_val_loss, "tokens_per_s": result.tokens_per_s}
        values = tuple(math.nan if figures[o] is None else figures[o] for o in job.objectives)
    if values is not None and not all(math.isfinite(v) for v in values):
        why = f"non-finite objective {values}" + (f" ({watch.reason})" if watch.reason else "")
        trial.set_user_attr("reason", why)
        values = tuple(math.nan for _ in values)  # Optuna stores NaN (not inf) as FAIL
    elif watch.reason:
        trial.set_user_attr("reason", watch.reason)
        raise optuna.TrialPruned(watch.reason)
    return values[0] if len(values) == 1 else values


class _Watch(Callback):
    """Reports the validation loss to the trial for pruning; stops an unstable run early."""

    def __init__(self, trial: Any, prune: bool) -> None:
        self.trial, self.prune, self.steps = trial, prune, 1
        self.reason: str | None = None
        self.reported = 0  # the last share reported: Optuna warns on a share reported twice

    def on_step_end(self, state: Any, metrics: Any) -> None:
        """Stop on a storm of skipped steps or a collapsed loss scale."""
        if self.reason is None and state.skipped_steps > SKIP_STORM * self.steps:
            self.reason = (f"unstable: {state.skipped_steps} of {state.step} steps skipped "
                           "(inf/NaN gradients)")  # fmt: skip
        elif self.reason is None and metrics.get("amp/loss_scale", SCALE_FLOOR) < SCALE_FLOOR:
            self.reason = f"unstable: the loss scale collapsed to {metrics['amp/loss_scale']:g}"
        state.should_stop = state.should_stop or self.reason is not None

    def on_eval_end(self, state: Any, metrics: Any) -> None:
        """Report at a fraction of the budget (1..REPORTS), so trials compare at equal shares."""
        share = max(1, round(REPORTS * state.step / self.steps))
        if state.step == 0 or self.reason is not None or not self.prune or share <= self.reported:
            return
        self.reported = share
        self.trial.report(metrics["val/loss"], share)
        if self.trial.should_prune():
            loss = metrics["val/loss"]
            self.reason = f"pruned at step {state.step}/{self.steps}: val loss {loss:.4f}"
            state.should_stop = True


def _train(trial: Any, job: SearchJob, watch: _Watch) -> Any:
    """Sample a config, build a fresh model and data for it, train with exactly its options."""
    import torch

    from amptrain.loop import fit

    cfg = search_space.apply(job.base, search_space.sample(trial, job.dims))
    cfg = search_space.budgeted(cfg, job.budget_steps, job.budget_tokens, job.block_targets,
                                job.eval_blocks, REPORTS)  # fmt: skip
    trial.set_user_attr("config", cfg.to_dict())
    watch.steps = cfg.fit.max_steps
    if job.factory is None:
        from amptrain.run_setup import prepare

        model, train, val, precision = prepare(cfg)
    else:
        model, train, val, precision = job.factory(), job.train, job.val, cfg.precision
    val = val.subset(torch.arange(min(len(val), job.eval_blocks)))
    return fit(model, train, val, precision=precision, callbacks=[watch], source=cfg.model,
               **dataclasses.asdict(cfg.fit))  # fmt: skip


def _metrics(result: Any) -> dict[str, Any]:
    keep = ("precision", "steps", "skipped_steps", "tokens", "tokens_per_s", "train_time_s",
            "final_train_loss", "final_val_loss", "final_val_accuracy", "loss_scale",
            "peak_mem_mb")  # fmt: skip
    figures = {k: v for k, v in result.to_dict().items() if k in keep}
    # The first step's learning rate shows that lr, warm-up and budget reached the scheduler.
    lrs = [r["train/lr"] for r in result.history if "train/lr" in r]
    return {**figures, "first_lr": lrs[0] if lrs else None}
