"""Finding the run and checkpoint a `--resume` names, and what must hold before it goes on.

The run directory and its newest loadable checkpoint; its saved settings; the checks that the
checkpoint belongs to those settings and that the data has not changed since (a resumed run
repeats the uninterrupted one only on the same data); and the metrics cut back to the step the
checkpoint holds. `train.run_training` calls them before it edits anything of the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from amptrain import checkpoint, data
from amptrain.config import TrainConfig, run_values
from amptrain.errors import DataError
from amptrain.metrics.sinks import CsvSink
from amptrain.models.digests import files_digest
from amptrain.resume_config import SWITCHABLE
from amptrain.runs import atomic_write_bytes


def find_resume(out: str | Path, resume: str, command: str) -> tuple[Path, checkpoint.Checkpoint]:
    """The run directory and loaded checkpoint that `--resume` names.

    Raises:
        FileNotFoundError: If nothing to resume is found.
        CheckpointError: If an explicitly named checkpoint, or every checkpoint of the run, is
            incomplete, corrupt or unsafe.
    """
    run_dir, path = resume_target(out, resume, command)
    if resume != "auto" and not (Path(resume) / "checkpoints").is_dir():
        return run_dir, checkpoint.load(path)  # named: that one, or an error naming it
    # A run: its newest checkpoint that loads, past any unreadable for whatever reason.
    return run_dir, checkpoint.load_newest(path.parent, f"--resume {resume}")


def resume_target(out: str | Path, resume: str, command: str) -> tuple[Path, Path]:
    """The run directory and checkpoint directory that `--resume` names, not loaded yet."""
    if resume == "auto":
        for run_dir in sorted(Path(out).glob(f"{command}-*"), reverse=True):
            path = checkpoint.latest(run_dir / "checkpoints")
            if path is not None:
                return run_dir, path
        raise FileNotFoundError(f"--resume auto: no {command} run under {out} has a checkpoint")
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        newest = checkpoint.latest(path / "checkpoints")
        if newest is None:
            raise FileNotFoundError(f"--resume {path}: the run has no complete checkpoint")
        return path, newest
    return path.parent.parent, path


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The settings a run's config.json holds (without its command and environment).

    Raises:
        FileNotFoundError: If the run has no config.json.
    """
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume {run_dir}: its config.json is missing")
    return run_values(json.loads(path.read_text(encoding="utf-8")))


def data_digest(cfg: TrainConfig) -> str:
    """sha256 over the names and content of every file `cfg.data` reads.

    Remembered per file size and time (`models.digests`), so a corpus is hashed once.
    """
    held_out = [] if cfg.val_data is None else data.source_files(data.held_out_source(cfg.val_data))
    return files_digest([*data.source_files(cfg.data), *held_out])


def check_data(cfg: TrainConfig, ckpt: checkpoint.Checkpoint) -> None:
    """Refuse to resume on data whose content changed: the run would not repeat.

    Raises:
        DataError: Naming the data, both digests and the fixes.
    """
    recorded = ckpt.trainer.get("data_sha256")
    if recorded is None:  # a checkpoint from before the digest was kept
        return
    now = data_digest(cfg)
    if now != recorded:
        raise DataError(
            f"--data {cfg.data}"
            f"{'' if cfg.val_data is None else f' or --val-data {cfg.val_data}'} changed since "
            f"{ckpt.path.name} was saved (sha256 "
            f"{recorded[:12]}... then, {now[:12]}... now); a resumed run repeats only on the same "
            f"data: put it back, or train on the new data as a new run with --init-from "
            f"{ckpt.path.parent.parent}"
        )


def check_config_hash(cfg: TrainConfig, ckpt: checkpoint.Checkpoint) -> None:
    """Refuse a checkpoint written under other settings than the run's config.json says.

    Raises:
        CheckpointError: Naming the checkpoint.
    """
    expected = ckpt.trainer.get("config_hash")
    # An extended or switched run's config.json has the new max_steps, strategy or checkpoint
    # format before its first new checkpoint: the checkpoint's own values are the ones hashed.
    fields = [name.removeprefix("fit.") for name in SWITCHABLE]
    written = {field: ckpt.trainer[field] for field in fields if field in ckpt.trainer}
    cfg = dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, **written))
    if expected and expected != checkpoint.config_hash(cfg.to_dict()):
        raise checkpoint.CheckpointError(
            f"checkpoint {ckpt.path} belongs to other settings than its run's config.json "
            "(config hash differs); resume it with the config it was trained with"
        )


def truncate_metrics(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """Keep only metric records up to `step` (what the checkpoint covers); return them."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by the interruption
            continue
        if record.get("step", 0) <= step:
            records.append(record)
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())
    (run_dir / "metrics.csv").unlink(missing_ok=True)
    csv_sink = CsvSink(run_dir / "metrics.csv")
    for record in records:
        csv_sink.log({k: v for k, v in record.items() if k != "step"}, record["step"])
    csv_sink.close()
    return records
