"""TensorBoard sink (the `tensorboard` extra), written with torch's own `SummaryWriter`.

Numbers become scalars under the loop's metric names (`train/loss`, `amp/loss_scale`, ...) at
the global optimizer step; text values (`mem/source`) become text entries. The run's settings,
with the resolved precision and its reason, become the run's hyperparameters (TensorBoard's
HPARAMS tab), written once with `train/loss` and `val/loss` declared as its metrics, so the tab
shows each run's latest values and sorts by them; the session is marked ended when the sink
closes. A failure to write costs one warning and training goes on (`ExternalSink`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amptrain._imports import requires
from amptrain.metrics.external import ExternalSink, run_config

# The HPARAMS tab's metric columns: it reads their values from this run's own scalars.
HPARAM_METRICS = ("val/loss", "train/loss")


class TensorBoardSink(ExternalSink):
    """Log metrics to a TensorBoard log directory.

    Args:
        log_dir: The folder of this run's event files (TensorBoard shows each folder under
            `tensorboard --logdir PARENT` as a run); created if missing.
        config: Run settings (e.g. `TrainConfig.to_dict()`), written as hyperparameters.
        precision: The resolved `Precision` (or its name): `precision` and `precision_reason`.
        precision_reason: Why that precision, when `precision` is given as a name.
        required: Raise `TrackerError` if the log folder cannot be made, instead of one
            warning and training without TensorBoard.

    Raises:
        ModuleNotFoundError: If tensorboard is not installed (with the install hint).
        TrackerError: With `required`, if the log folder cannot be written.

    Example:
        >>> sink = TensorBoardSink("runs/tb/lr3e-3", config={"lr": 3e-3})  # doctest: +SKIP
        >>> amptrain.fit(model, train, val, sinks=[sink])  # doctest: +SKIP
    """

    tool = "TensorBoard"
    fix = "choose a --tensorboard folder that can be created and written"

    def __init__(
        self,
        log_dir: str | Path,
        config: Mapping[str, Any] | None = None,
        *,
        precision: Any = None,
        precision_reason: str | None = None,
        required: bool = False,
    ) -> None:
        requires("tensorboard", "tensorboard", "the TensorBoard sink",
                 "use the run directory's metrics.jsonl")  # fmt: skip
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(required=required)
        self.log_dir = Path(log_dir)
        self.writer = self._open(SummaryWriter, str(self.log_dir))
        self._session_started = False
        self.log_config(run_config(config, precision, precision_reason))

    def _write_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        if self._session_started:  # TensorBoard keeps the first session record of a run
            return
        # What `SummaryWriter.add_hparams` writes, but into this run's own event file instead
        # of a new sub-run per call, so the HPARAMS tab and the scalars are one run; the
        # session's end is written when the sink closes.
        experiment, start, _ = hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0))
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)
        self.writer.flush()
        self._session_started = True

    def _write_numbers(self, numbers: dict[str, float], step: int) -> None:
        self._check_folder()
        for name, value in numbers.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # TensorBoard reads the file while training runs

    def _write_texts(self, texts: dict[str, str], step: int) -> None:
        self._check_folder()
        for name, value in texts.items():
            self.writer.add_text(name, value, step)

    def _check_folder(self) -> None:
        """Fail in the sink's guard when the log folder is gone.

        TensorBoard's own writer thread would fail too, with a traceback of its own.
        """
        if not self.log_dir.is_dir():
            raise FileNotFoundError(f"the log folder {self.log_dir} was removed")

    def _finish(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        if not self.log_dir.is_dir():
            return  # nothing to end; writing would fail in TensorBoard's thread

        if self._session_started:
            self.writer.file_writer.add_summary(hparams({}, {})[2])  # status: success
        self.writer.close()
