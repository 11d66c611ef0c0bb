"""Lightning integration (the `lightning` extra): an AMP monitor callback and precision names.

`AmpMonitor` logs, through the trainer's own loggers (CSV, TensorBoard, W&B...) at
`trainer.global_step`: whether AMP is on and the precision's width, the loss scale, skipped
steps and the loss scale's growth and back-off events. The effective precision (what the
trainer's precision plugin really does, which on CPU is not always what was asked for) goes
into the loggers' hyperparameters at fit start.

A skipped step is read from the GradScaler's found-inf flags in `on_before_optimizer_step`:
Lightning calls `scaler.unscale_(optimizer)` just before that hook, and `scaler.step` skips the
optimizer step exactly when those flags sum to non-zero, so this is the scaler's own decision,
per optimizer, with no guessing from changes of the scale (a back-off happens after a skip,
but the scale also stays put at its floor, and grows on its own schedule). Comparing optimizer
step counts would need optimizer-specific state. Growth and back-off are the scale after
`scaler.update()` compared with the scale before the step.

The callback must be passed when the Trainer is built, `Trainer(callbacks=[AmpMonitor()])`:
Lightning copies the list at construction, so appending to it afterwards does nothing.
Works with `lightning` and with `pytorch_lightning` (the hooks are the same).
"""

from __future__ import annotations

import logging
from typing import Any

from amptrain._imports import requires
from amptrain.precision import normalize, resolve

try:  # optional base class: importing this module never fails without Lightning
    from lightning.pytorch import Callback
except ImportError:
    try:
        from pytorch_lightning import Callback
    except ImportError:
        Callback = object

log = logging.getLogger("amptrain")

# amptrain's names -> Lightning's precision strings.
LIGHTNING_NAMES = {"fp32": "32-true", "tf32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
_BITS = {"64": 64, "32": 32, "16": 16, "bf16": 16}


def _check() -> None:
    requires("lightning", "lightning", "the Lightning AMP monitor")
    if Callback is object:  # installed but not importable
        raise ModuleNotFoundError(
            "lightning (or pytorch_lightning) is installed but cannot be imported; "
            "reinstall it with: pip install 'amptrain[lightning]'",
            name="lightning",
        )


def lightning_precision(requested: str, device: Any = "cpu") -> tuple[str, str]:
    """Map an amptrain precision (or `auto`, or a Lightning alias) to Lightning's string.

    Args:
        requested: `fp32`, `tf32`, `fp16`, `bf16`, `auto`, or `32-true`/`16-mixed`/`bf16-mixed`.
        device: The device the Trainer trains on (`cpu`, `cuda`, a `torch.device`).

    Returns:
        `(lightning_string, reason)`, e.g. `("bf16-mixed", "auto: this CPU has amx_bf16 ...")`.

    Raises:
        PrecisionError: For an unknown name or one the device cannot serve, with the reason.

    Example:
        >>> lightning_precision("fp32", "cpu")
        ('32-true', 'requested')
    """
    prec = resolve(requested, device)
    reason = prec.reason
    if prec.name == "tf32":
        reason += (
            "; Lightning has no TF32 precision flag: call "
            "torch.set_float32_matmul_precision('high') before trainer.fit"
        )
    if prec.name == "fp16" and prec.device.type == "cpu":
        reason += (
            "; Trainer(precision='16-mixed') on CPU silently trains bf16-mixed, so pass "
            "plugins=[MixedPrecision('16-mixed', 'cpu', scaler=torch.amp.GradScaler('cpu'))] "
            "instead of precision="
        )
    return LIGHTNING_NAMES[prec.name], reason


def describe(precision: str, scaler: Any = None) -> str:
    """Why a Lightning precision string trains the way it does, in words."""
    text = str(precision)
    if text in ("16-mixed", "16") and scaler is not None:
        return (
            f"fp16 autocast with dynamic loss scaling (GradScaler init scale "
            f"{scaler.get_scale():g}, growth interval {scaler.get_growth_interval()})"
        )
    return {
        "bf16-mixed": "bf16 autocast, fp32 weights, no loss scaling",
        "16-mixed": "fp16 autocast without a GradScaler",
        "32-true": "fp32",
        "16-true": "pure fp16 weights and activations: no fp32 master weights, no loss scaling",
        "bf16-true": "pure bf16 weights and activations: no fp32 master weights",
        "64-true": "fp64",
    }.get(text, f"Lightning precision {text!r}")


class AmpMonitor(Callback):
    """Log AMP state through the trainer's loggers at the global step.

    Metrics: `amp/enabled` (1 with autocast), `amp/precision_bits` (16 or 32),
    `amp/loss_scale` (1.0 without a scaler), `amp/step_skipped` (0/1),
    `amp/skipped_steps`, `amp/scale_growths` and `amp/scale_backoffs` (running counts).
    Hyperparameters at fit start: `amp/precision` and `amp/precision_reason`.

    Args:
        log_every_n_steps: Log every this many optimizer steps (default: the trainer's
            `log_every_n_steps`); a skipped step, a scale change and the last step always log.
        requested: The precision you asked for; a warning says when the trainer runs another
            (Lightning turns '16-mixed' on CPU into 'bf16-mixed').

    Raises:
        ModuleNotFoundError: If neither lightning nor pytorch_lightning is installed.

    Example:
        >>> trainer = Trainer(precision="bf16-mixed", callbacks=[AmpMonitor()])  # doctest: +SKIP
    """

    def __init__(self, log_every_n_steps: int | None = None, requested: str | None = None) -> None:
        _check()
        self.log_every_n_steps = log_every_n_steps
        self.requested = requested
        self.precision, self.reason = "unknown", ""
        self.skipped_steps = self.scale_growths = self.scale_backoffs = 0
        self._scaler: Any = None
        self._stepped = self._found_inf = False
        self._scale_before = 1.0
        self._last_logged = -1

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Read the effective precision and the scaler from the trainer's precision plugin."""
        self.skipped_steps = self.scale_growths = self.scale_backoffs = 0  # counts per fit
        plugin = trainer.strategy.precision_plugin
        self.precision = str(getattr(plugin, "precision", trainer.precision))
        scaler = getattr(plugin, "scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.reason = describe(self.precision, self._scaler)
        params = {"amp/precision": self.precision, "amp/precision_reason": self.reason}
        if self.requested is not None and _differs(self.requested, self.precision):
            params["amp/precision_requested"] = self.requested
            log.warning(
                "the trainer runs precision %r, not the requested %r (%s)",
                self.precision, self.requested, self.reason,
            )  # fmt: skip
        self.emit_params(trainer, params)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Read the scaler's found-inf flags, set by `unscale_` just before this hook."""
        if not self._stepped:
            self._stepped, self._found_inf = True, False
            self._scale_before = self._scale()
        if self._scaler is not None:
            found = self._scaler._found_inf_per_device(optimizer)
            # One host sync, the same one scaler.step() makes to decide whether to skip.
            self._found_inf |= bool(sum(float(v) for v in found.values()))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After an optimizer step (not after a micro-batch of accumulation): count and log."""
        if not self._stepped:
            return
        self._stepped = False
        scale = self._scale()
        grew, backed_off = scale > self._scale_before, scale < self._scale_before
        self.skipped_steps += self._found_inf
        self.scale_growths += grew
        self.scale_backoffs += backed_off
        step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if self._found_inf or grew or backed_off or step % every == 0 or step == 1:
            self._log(trainer, step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Log the final state at the last step, if the cadence missed it."""
        if trainer.global_step != self._last_logged:
            self._log(trainer, trainer.global_step)

    def metrics(self) -> dict[str, float]:
        """The AMP figures as they stand now."""
        mixed = self.precision.endswith("-mixed") or self.precision == "16"
        bits = _BITS.get(self.precision.split("-")[0], 32)
        return {
            "amp/enabled": float(mixed),
            "amp/precision_bits": float(bits),
            "amp/loss_scale": self._scale(),
            "amp/step_skipped": float(self._found_inf),
            "amp/skipped_steps": float(self.skipped_steps),
            "amp/scale_growths": float(self.scale_growths),
            "amp/scale_backoffs": float(self.scale_backoffs),
        }

    def _log(self, trainer: Any, step: int) -> None:
        self._last_logged = step
        self.emit(trainer, self.metrics(), step)

    def emit_params(self, trainer: Any, params: dict[str, str]) -> None:
        """Send the precision description to every logger's hyperparameters."""
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def emit(self, trainer: Any, metrics: dict[str, float], step: int) -> None:
        """Send `metrics` to every logger of the trainer at `step`; override to send elsewhere."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _scale(self) -> float:
        return float(self._scaler.get_scale()) if self._scaler is not None else 1.0


# Lightning's legacy spellings, as Lightning itself reads them.
_LEGACY = {"16": "16-mixed", "32": "32-true", "bf16": "bf16-mixed", "64": "64-true"}


def _differs(requested: str, effective: str) -> bool:
    requested, effective = (_LEGACY.get(str(p), str(p)) for p in (requested, effective))
    try:
        return normalize(requested) != normalize(effective)
    except ValueError:  # a Lightning string amptrain refuses, e.g. '16-true'
        return requested != effective
