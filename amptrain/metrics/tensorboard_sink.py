"""TensorBoard sink (the `tensorboard` extra), written with torch's own `SummaryWriter`.

Numbers become scalars under the loop's metric names (`train/loss`, `amp/loss_scale`, ...) at
the global optimizer step; text values (`mem/source`) become text entries. The run's settings,
with the resolved precision and its reason, become the run's hyperparameters (TensorBoard's
HPARAMS tab). A failure to write costs one warning and training goes on (`ExternalSink`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amptrain._imports import requires
from amptrain.metrics.external import ExternalSink, run_config


class TensorBoardSink(ExternalSink):
    """Log metrics to a TensorBoard log directory.

    Args:
        log_dir: The folder of this run's event files (TensorBoard shows each folder under
            `tensorboard --logdir PARENT` as a run); created if missing.
        config: Run settings (e.g. `TrainConfig.to_dict()`), written as hyperparameters.
        precision: The resolved `Precision` (or its name): `precision` and `precision_reason`.
        precision_reason: Why that precision, when `precision` is given as a name.

    Raises:
        ModuleNotFoundError: If tensorboard is not installed (with the install hint).

    Example:
        >>> sink = TensorBoardSink("runs/tb/lr3e-3", config={"lr": 3e-3})  # doctest: +SKIP
        >>> amptrain.fit(model, train, val, sinks=[sink])  # doctest: +SKIP
    """

    tool = "TensorBoard"

    def __init__(
        self,
        log_dir: str | Path,
        config: Mapping[str, Any] | None = None,
        *,
        precision: Any = None,
        precision_reason: str | None = None,
    ) -> None:
        requires("tensorboard", "tensorboard", "the TensorBoard sink",
                 "use the run directory's metrics.jsonl")  # fmt: skip
        from torch.utils.tensorboard import SummaryWriter

        super().__init__()
        self.log_dir = Path(log_dir)
        self.writer = self._guard("start", SummaryWriter, str(self.log_dir))
        if self.writer is None:
            self._disabled = True
        self.log_config(run_config(config, precision, precision_reason))

    def _write_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # What `SummaryWriter.add_hparams` writes, but into this run's own event file instead
        # of a new sub-run per call, so the HPARAMS tab and the scalars are one run.
        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def _write_numbers(self, numbers: dict[str, float], step: int) -> None:
        for name, value in numbers.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # TensorBoard reads the file while training runs

    def _write_texts(self, texts: dict[str, str], step: int) -> None:
        for name, value in texts.items():
            self.writer.add_text(name, value, step)

    def _finish(self) -> None:
        self.writer.close()
