"""The original training helpers: MetricsTracker, compute_effective_precision, AmpWandbCallback.

Same names, signatures and record keys as the original toolkit (see `amptrain.compat` for the
list of behaviour changes), over amptrain's `Tracker` and Lightning monitor. Lightning is
imported only when `AmpWandbCallback` is first used, so importing this module stays light.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch

from amptrain._imports import WANDB_AVAILABLE, requires
from amptrain.metrics.tracker import Tracker

log = logging.getLogger("amptrain")

# Lightning 2.x precision strings (with its legacy short forms) that the original passed on.
LIGHTNING_PRECISIONS = ("32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed",
                        "bf16-true", "64", "64-true")  # fmt: skip
_BF16 = ("bf16", "bf16-mixed", "bf16-true")


class MetricsTracker(Tracker):
    """Per-epoch metrics with the original keys, kept in memory (and sent to W&B if asked).

    Args:
        use_wandb: Also log every epoch to the active W&B run (`wandb.init()` first); a
            missing package or run, or a failing call, costs one warning.
    """

    def __init__(self, use_wandb: bool = True) -> None:
        super().__init__()
        self.use_wandb = use_wandb
        self._wandb_warned = False

    @property
    def metrics_history(self) -> list[dict[str, Any]]:
        """One dict per logged epoch, in order."""
        return [{k: v for k, v in r.items() if k != "step"} for r in self.records]

    def compute_perplexity(self, loss: float) -> float:
        """`exp(loss)`, unclipped (inf once it overflows, past a loss of about 709)."""
        loss = float(loss)
        return math.exp(loss) if loss < 709 else math.inf

    def compute_accuracy(
        self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
    ) -> float:
        """Share of argmax predictions equal to their label, `ignore_index` positions left out.

        Shapes `[B, T, V]` with `[B, T]`, or flattened `[N, V]` with `[N]`. Returns nan when
        every label is ignored.
        """
        predicted = logits.argmax(-1).reshape(labels.shape)
        valid = labels != ignore_index
        count = int(valid.sum())
        return float(((predicted == labels) & valid).sum()) / count if count else math.nan

    def log_epoch(
        self,
        epoch: int,
        train_metrics: dict[str, float],
        val_metrics: dict[str, float],
        learning_rate: float,
        gradient_norm: float,
        epoch_duration: float,
    ) -> dict[str, Any]:
        """Record one epoch (`train_metrics`/`val_metrics` hold `loss` and `accuracy`)."""
        row: dict[str, Any] = {"epoch": epoch}
        for split, values in (("train", train_metrics), ("val", val_metrics)):
            loss = float(values["loss"])
            row[f"{split}/loss"] = loss
            row[f"{split}/perplexity"] = self.compute_perplexity(loss)
            row[f"{split}/accuracy"] = float(values.get("accuracy", math.nan))
        row.update(learning_rate=float(learning_rate), gradient_norm=float(gradient_norm),
                   epoch_duration=float(epoch_duration))  # fmt: skip
        if torch.cuda.is_available():
            # The peak since the previous epoch, not since the process started.
            device = torch.cuda.current_device()
            row["system/gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        self.log(row, step=epoch)
        if self.use_wandb:
            self._to_wandb(row)
        log.info(
            "Epoch %d: train_loss=%.4f val_loss=%.4f val_ppl=%.2f val_acc=%.4f", epoch,
            row["train/loss"], row["val/loss"], row["val/perplexity"], row["val/accuracy"],
        )  # fmt: skip
        return row

    def get_summary(self) -> Any:
        """The epochs as a pandas DataFrame, one row each."""
        requires("pandas", "all", "MetricsTracker.get_summary", "use .metrics_history")
        import pandas as pd

        return pd.DataFrame(self.metrics_history)

    def get_best_epoch(self, metric: str = "val/loss", mode: str = "min") -> int:
        """The `epoch` of the best finite `metric` (ties: the earliest).

        Raises:
            ValueError: If `mode` is not `min` or `max`.
            KeyError: If no epoch has a finite value of `metric`.
        """
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} must be 'min' or 'max'")
        rows = [r for r in self.metrics_history if _finite(r.get(metric))]
        if not rows:
            raise KeyError(f"no logged epoch has a finite {metric!r}; call log_epoch first")
        pick = min if mode == "min" else max
        return int(pick(rows, key=lambda r: r[metric])["epoch"])

    def _to_wandb(self, row: dict[str, Any]) -> None:
        if self._wandb_warned:
            return
        try:
            if not WANDB_AVAILABLE:
                raise RuntimeError("wandb is not installed (pip install 'amptrain[wandb]')")
            import wandb

            # The module function, as the original called it (and as tests patch it). W&B's
            # own step, with `epoch` in the record: an explicit step=epoch would go backwards
            # against loggers that count optimizer steps, and W&B drops those.
            wandb.log(row)
        except Exception as exc:
            self._wandb_warned = True
            from amptrain.secrets import env_secrets, scrub

            log.warning("W&B logging failed (%s); epochs stay in the tracker",
                        scrub(str(exc), env_secrets("WANDB_API_KEY")))  # fmt: skip

    def _get_gpu_utilization(self) -> float:
        """GPU utilisation in percent from `nvidia-smi` (the first GPU); 0.0 if unavailable."""
        import subprocess

        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout  # fmt: skip
            return float(out.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return 0.0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def compute_effective_precision(
    requested_precision: str, use_amp: bool | None, cuda_available: bool, use_gpu: bool
) -> str:
    """The Lightning precision string a run should use, from the original AMP flags.

    | use_amp | GPU usable (CUDA and use_gpu) | result |
    |---|---|---|
    | None | any | `requested_precision` (an fp16 request without a usable GPU is refused) |
    | truthy | yes | `'16'` (a bf16 request stays bf16) |
    | truthy | no | `'32'` (a bf16 request stays bf16) |
    | falsy, not None | any | `'32'` |

    Where the original returned a value it still does, with a warning when amptrain knows
    the value will not do what it says: a string Lightning does not know (the original's
    `'16_true'` is `'16-true'`), and `'16'`/`'16-mixed'` with `use_amp=None` and no usable
    GPU, which Lightning silently turns into bf16.
    """
    requested = str(requested_precision)
    gpu = bool(cuda_available) and bool(use_gpu)
    if use_amp is None:
        if requested not in LIGHTNING_PRECISIONS:
            log.warning(
                "requested_precision=%r is not a Lightning precision and Lightning will refuse "
                "it; valid: %s", requested, ", ".join(LIGHTNING_PRECISIONS),
            )  # fmt: skip
        elif requested in ("16", "16-mixed") and not gpu:
            log.warning(
                "requested_precision=%r without a usable GPU (cuda_available=%s, use_gpu=%s): "
                "Lightning will train bf16-mixed instead; ask for 'bf16-mixed' or '32'",
                requested, cuda_available, use_gpu,
            )  # fmt: skip
        return requested
    if not use_amp:
        if requested in _BF16:
            log.info("use_amp=%r turns mixed precision off: %r becomes '32'", use_amp, requested)
        return "32"
    if requested in _BF16:
        return requested  # bf16 is AMP too; the original downgraded it to fp16
    return "16" if gpu else "32"


def __getattr__(name: str) -> Any:
    if name == "AmpWandbCallback":
        return _amp_wandb_callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _amp_wandb_callback() -> type:
    """Build the class on first use: its Lightning base costs seconds to import."""
    from amptrain.integrations.lightning import AmpMonitor

    class AmpWandbCallback(AmpMonitor):
        """Log AMP state to the active W&B run, with `trainer/global_step` as its x-axis.

        Pass it when the Trainer is built, `Trainer(callbacks=[AmpWandbCallback(...)])`:
        Lightning copies the list at construction, so a callback appended afterwards never
        runs (the original's defect). Records go in at W&B's own step with
        `trainer/global_step` beside them, the convention of Lightning's `WandbLogger`, so
        they line up with its records and none is dropped as out of order.

        Args:
            enabled: Kept for the original signature; what is logged is what the trainer's
                precision plugin does (bf16 counts as AMP).
            precision: The precision asked for; a warning says if the trainer runs another.
        """

        def __init__(self, enabled: bool, precision: str) -> None:
            super().__init__(requested=precision)
            self.enabled, self.precision = bool(enabled), precision
            self._warned = False

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            """A Lightning fit: per-step logging at the global step (see `AmpMonitor`)."""
            self._fitting = True
            super().on_fit_start(trainer, pl_module)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            """Log the original's record at `trainer.current_epoch`, outside a Lightning fit.

            A trainer-like object called by hand gets what the original logged; inside a
            Lightning fit the steps are already logged, so this does nothing.
            """
            if getattr(self, "_fitting", False) or not WANDB_AVAILABLE:
                return
            import wandb

            if not wandb.run:
                return
            record: dict[str, Any] = {"amp/enabled": int(self.enabled),
                                      "amp/precision": self.precision}  # fmt: skip
            if self.enabled and self.precision in ("16", "16-mixed", "16_true"):
                scale = self._get_loss_scale(trainer)
                if scale is not None:
                    record["amp/loss_scale"] = scale
            self._guard(wandb.log, record, step=getattr(trainer, "current_epoch", None))

        def _get_loss_scale(self, trainer: Any) -> float | None:
            """`trainer.strategy.precision_plugin.scaler.get_scale()`, or None if absent."""
            try:
                scaler = trainer.strategy.precision_plugin.scaler
                return None if scaler is None else float(scaler.get_scale())
            except Exception:  # any missing link, as in the original
                return None

        def emit_params(self, trainer: Any, params: dict[str, str]) -> None:
            """Put the effective precision into the W&B run config."""
            run = self._run()
            if run is not None:
                self._guard(run.define_metric, "amp/*", step_metric="trainer/global_step")
                enabled = self.metrics()["amp/enabled"] == 1.0
                values = {**params, "amp_enabled": enabled, "amp_precision": self.precision}
                self._guard(run.config.update, values, allow_val_change=True)

        def emit(self, trainer: Any, metrics: dict[str, float], step: int) -> None:
            """Log the AMP figures with `trainer/global_step`."""
            run = self._run()
            if run is not None:
                self._guard(run.log, {**metrics, "trainer/global_step": step})

        def _run(self) -> Any:
            if WANDB_AVAILABLE:
                import wandb

                if wandb.run is not None:
                    return wandb.run
            self._warn("no active W&B run (install wandb and call wandb.init() before fit)")
            return None

        def _guard(self, fn: Any, *args: Any, **kwargs: Any) -> None:
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # W&B must not cost the training run
                self._warn(f"W&B call failed ({type(exc).__name__}: {exc})")

        def _warn(self, message: str) -> None:
            if not self._warned:
                self._warned = True
                from amptrain.secrets import env_secrets, scrub

                log.warning("AmpWandbCallback: %s; AMP state not logged to W&B",
                            scrub(message, env_secrets("WANDB_API_KEY")))  # fmt: skip

    AmpWandbCallback.__module__ = __name__
    AmpWandbCallback.__qualname__ = "AmpWandbCallback"
    return AmpWandbCallback
