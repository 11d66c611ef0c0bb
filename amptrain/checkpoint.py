"""Checkpoints that resume exactly and load safely.

A checkpoint is a directory `checkpoints/step-000120/` holding `model.pt`, `optimizer.pt`,
`scheduler.pt`, `scaler.pt` and `rng.pt` (tensors and plain containers only, so everything
loads with `torch.load(..., weights_only=True)`), `trainer.json` (counters, data position,
config hash, format version) and `manifest.json` (size and sha256 of every file), written last.
It is assembled in a temporary directory beside its final place and renamed into place, so a
crash leaves either the whole checkpoint or none. A checkpoint whose files do not match its
manifest is incomplete or corrupt and is never loaded.

A sharded run's checkpoint (see `resharding`) has a `shards/` directory of DCP files, which
every rank writes into the temporary directory, in place of `model.pt` and `optimizer.pt`;
its manifest lists those files too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from amptrain.errors import AmptrainError, EnvironmentFailure, weights_only_refusal

log = logging.getLogger("amptrain")

FORMAT_VERSION = 1
_NAME = re.compile(r"step-(\d{9})")
TRANSIENT = ("should_stop", "stop_signal", "stop_requested", "evaluating")
"""`TrainState` fields that are requests of the moment, not state to resume."""
_TENSOR_FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng.pt")
SHARDS = "shards"
"""The directory of a sharded checkpoint's DCP files (model and optimizer state)."""
_SHARDED_FILES = ("scheduler.pt", "scaler.pt", "rng.pt", f"{SHARDS}/.metadata")


class CheckpointError(AmptrainError, RuntimeError):
    """A checkpoint cannot be trusted or used for this run."""


class CheckpointWriteError(CheckpointError, EnvironmentFailure):
    """A checkpoint could not be written (disk full, permissions); earlier ones are untouched."""

    exit_code = 3


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: where it was, its counters, and its tensors (weights-only loaded)."""

    path: Path
    trainer: dict[str, Any]
    tensors: dict[str, Any]

    @property
    def precision(self) -> str | None:
        """The precision the run was trained in (from trainer.json, else the scaler's record)."""
        scaler = self.tensors.get("scaler")
        return self.trainer.get("precision") or (
            scaler.get("name") if isinstance(scaler, dict) else None
        )

    @property
    def sharded(self) -> bool:
        """True when the model and optimizer state are DCP shards under `shards/`."""
        return (self.path / SHARDS).is_dir()


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a run's settings."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _HashingWriter:
    """A file that hashes and counts what is written through it, and keeps the write error.

    torch's writer turns an error of the file it writes to into its own RuntimeError
    ("enforce fail at inline_container.cc"); the original (a full disk) is kept here.
    """

    def __init__(self, file: Any) -> None:
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def write_file(path: Path, payload: bytes | Callable[[Any], None]) -> dict[str, Any]:
    """Write one file of a checkpoint, durably (fsync), readable by the user only.

    Every byte of a checkpoint reaches the disk through here, so this is where a fault (a full
    disk, a signal mid-write) meets the checkpoint and where the fault tests inject one.

    Args:
        path: The file.
        payload: Its bytes, or a function that writes them to the file object it is given
            (`torch.save` streams a state that way: it is never whole in memory).

    Returns:
        The file's manifest entry: `{"size": bytes, "sha256": hex digest}`, of what was written.
    """
    with open(os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600), "wb") as f:
        out = _HashingWriter(f)
        try:
            payload(out) if callable(payload) else out.write(payload)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return {"size": out.size, "sha256": out.sha256.hexdigest()}


def save(
    root: str | Path,
    step: int,
    tensors: dict[str, Any],
    trainer: dict[str, Any],
    keep_last: int = 3,
    staged: Path | None = None,
) -> Path:
    """Write checkpoint `root/step-<step>` atomically, then delete all but the newest `keep_last`.

    Args:
        root: The run's `checkpoints/` directory.
        step: The global optimizer step the state belongs to.
        tensors: `{"model": ..., "optimizer": ..., "scheduler": ..., "scaler": ..., "rng": ...}`.
        trainer: JSON-ready counters; the format version is added.
        keep_last: Complete checkpoints to keep; older ones go only after this one is complete.
        staged: A temporary directory (`staging_dir`) that already holds files written by
            every rank (DCP shards); they join the manifest and the rename.

    Raises:
        CheckpointWriteError: If any write fails (disk full, permission...); the directory is named,
            the previous checkpoints are untouched and nothing is reported as saved.
    """
    root = Path(root)
    final = root / f"step-{step:09d}"
    tmp = staged or root / f".tmp-{final.name}-{os.getpid()}"
    info = json.dumps({**trainer, "format_version": FORMAT_VERSION}, indent=2).encode()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if staged is None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(mode=0o700)
        # Each state streams into its file, hashed as it goes: never whole in memory (a
        # failing one leaves only the temporary directory, which is removed).
        manifest = {f"{name}.pt": write_file(tmp / f"{name}.pt", _streamed(value))
                    for name, value in tensors.items()}  # fmt: skip
        manifest["trainer.json"] = write_file(tmp / "trainer.json", info)
        if staged is not None:
            manifest.update(_describe_tree(staged))
        write_file(tmp / "manifest.json", json.dumps(manifest, indent=2).encode())  # last
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except (OSError, MemoryError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "out of memory" if isinstance(exc, MemoryError) else exc.strerror or exc
        raise CheckpointWriteError(
            f"could not write checkpoint {final.name} in {root}: {why}; "
            "earlier checkpoints are untouched"
        ) from exc
    except BaseException:  # a second Ctrl-C: leave no half-written temporary behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _rotate(root, keep_last)
    return final


def staging_dir(root: str | Path, step: int) -> Path:
    """The temporary directory every rank writes a sharded checkpoint of `step` into."""
    return Path(root) / f".tmp-step-{step:09d}-staged"


def _describe_tree(staged: Path) -> dict[str, dict[str, Any]]:
    """Manifest entries of the files below `staged` (one directory level: `shards/`)."""
    return {
        file.relative_to(staged).as_posix(): {"size": file.stat().st_size, "sha256": _sha256(file)}
        for file in sorted(staged.glob("*/*"))
        if file.is_file()
    }


def _streamed(value: Any) -> Callable[[Any], None]:
    """`value` as a payload of `write_file`: `torch.save` writes it record by record."""
    return lambda file: torch.save(value, file)


def _discard(path: Path) -> None:
    """Delete a checkpoint directory so that its `step-*` name is never left half-deleted.

    The rename is atomic; a kill during the deletion leaves a `.tmp-step-*` directory, which
    `clean_temporaries` removes at the next start.
    """
    doomed = path.with_name(f".tmp-{path.name}-old-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rotate(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints, and remove the rest.

    The rest: the older complete ones, and any older than the newest complete one that fails
    verification (it could never be resumed).
    """
    checked = [(path, verify(path)) for path in list_checkpoints(root)]
    complete = [path for path, broken in checked if broken is None]
    for old in complete[:-keep_last] if keep_last > 0 else []:
        _discard(old)
    for path, broken in checked:
        if broken is not None and complete and path.name < complete[-1].name:
            log.warning("removed checkpoint %s, which cannot be resumed (%s)", path.name, broken)
            _discard(path)


def clean_temporaries(root: str | Path) -> None:
    """Remove `.tmp-*` directories a killed save left behind."""
    for tmp in Path(root).glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def verify(path: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable manifest.json ({exc})"
    if not isinstance(manifest, dict):
        return "manifest.json is not a JSON object"
    required = _SHARDED_FILES if f"{SHARDS}/.metadata" in manifest else _TENSOR_FILES
    unlisted = sorted({*required, "trainer.json"} - set(manifest))
    if unlisted:
        return f"manifest.json does not list {unlisted}"
    for name, meta in manifest.items():
        if not _inside(name):
            return f"manifest.json names {name!r}, outside the checkpoint directory"
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int)
                and isinstance(meta.get("sha256"), str)):  # fmt: skip
            return f"manifest.json entry {name!r} is malformed"
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != meta["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {meta['size']}"
        if _sha256(file) != meta["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def _inside(name: str) -> bool:
    """A manifest name is a file of the checkpoint directory or of its `shards/`."""
    parts = Path(name).parts
    if any(part in ("", ".", "..") for part in parts) or "\\" in name or name.startswith("/"):
        return False
    return len(parts) == 1 or (len(parts) == 2 and parts[0] == SHARDS)


def load(path: str | Path) -> Checkpoint:
    """Load one checkpoint directory after checking it against its manifest.

    Raises:
        FileNotFoundError: If the path does not exist.
        CheckpointError: If it is incomplete, corrupt, of a newer format, or holds anything
            but tensors and plain containers (it is never unpickled freely).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: {problem}")
    trainer = _trainer_json(path)
    if trainer.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {trainer['format_version']}; this amptrain "
            f"reads up to {FORMAT_VERSION}: upgrade amptrain"
        )
    tensors = {}
    for name in _TENSOR_FILES:
        if (path / name).is_file() or not (path / SHARDS).is_dir():
            tensors[name[:-3]] = safe_torch_load(path / name)
            if not isinstance(tensors[name[:-3]], dict):  # what every reader of it relies on
                raise CheckpointError(
                    f"checkpoint {path}: {name} holds a {type(tensors[name[:-3]]).__name__}, not "
                    "the dict amptrain writes; it was edited by hand or damaged"
                )
    return Checkpoint(path, trainer, tensors)


def _trainer_json(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer.json, checked for the shape every reader of it relies on.

    Raises:
        CheckpointError: Not JSON, not an object, or a step that is not a whole number >= 0.
    """
    try:
        trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {path}: trainer.json is not JSON ({exc})") from None
    if not isinstance(trainer, dict):
        raise CheckpointError(
            f"checkpoint {path}: trainer.json holds a JSON {type(trainer).__name__}, not the "
            "object of counters amptrain writes; it was edited by hand or damaged"
        )
    step = trainer.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(
            f"checkpoint {path}: trainer.json's step is {step!r}, not a whole number >= 0; it "
            "was edited by hand or damaged"
        )
    return trainer


def safe_torch_load(path: Path) -> Any:
    """`torch.load` with `weights_only=True`: tensors and plain containers only, never code."""
    try:
        with warnings.catch_warnings():  # said in the refusal below, if the load fails
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if re.search(r"unsupported (global|class)", str(exc), flags=re.IGNORECASE):
            raise CheckpointError(weights_only_refusal(path, exc)) from None
        protocol = _pickle_protocol(path)
        if protocol is not None and protocol > 3:
            raise CheckpointError(
                f"cannot read {path}: it was saved with pickle protocol {protocol}, which "
                "torch's safe loader (weights_only) does not read; save it again with "
                "torch.save's default protocol, or as safetensors"
            ) from None
        raise CheckpointError(_unreadable(path, exc)) from None
    except Exception as exc:  # noqa: BLE001 - garbage bytes fail anywhere in the unpickler
        raise CheckpointError(_unreadable(path, exc)) from None


def _pickle_protocol(path: Path) -> int | None:
    """The pickle protocol of a torch.save file (zip or legacy) or a plain pickle, if known."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                head = archive.open(name).read(2)
        else:
            with open(path, "rb") as f:
                head = f.read(2)
    except (OSError, StopIteration, zipfile.BadZipFile):
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None  # PROTO opcode


def _unreadable(path: Path, exc: BaseException) -> str:
    """Why a file is no torch.save output, in one line (torch's own text can run to ten)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    why = next((line for line in lines if "Unsupported" in line), lines[-1] if lines else "")
    return (
        f"cannot read {path}: it is damaged or not a file torch.save wrote "
        f"({type(exc).__name__}{': ' + why[:200] if why else ''})"
    )


def load_newest(root: str | Path, refuse: str = "--resume") -> Checkpoint:
    """Load the newest checkpoint under `root` that loads, falling back past any that do not.

    A checkpoint can fail for any reason: files that do not match the manifest, a payload
    that matches it and is garbage or holds code, a newer format. Each one skipped is named in
    a warning, with why, beside the one used.

    Raises:
        FileNotFoundError: If `root` holds no checkpoint at all.
        CheckpointError: If none loads, with each one's reason.
    """
    skipped = []
    for path in reversed(list_checkpoints(root)):
        try:
            ckpt = load(path)
        except CheckpointError as exc:
            skipped.append(f"checkpoint {path.name} incomplete/corrupt ({exc})")
            continue
        if skipped:
            log.warning("skipped %s; using %s", "; ".join(skipped), path.name)
        return ckpt
    if not skipped:
        raise FileNotFoundError(f"{refuse}: {root} holds no checkpoint")
    raise CheckpointError(f"{refuse}: no checkpoint under {root} can be used: {'; '.join(skipped)}")


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`; the broken ones skipped are named."""
    skipped = []
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            if skipped:
                log.warning("skipped %s; using %s", "; ".join(skipped), path.name)
            return path
        skipped.append(f"checkpoint {path.name} incomplete/corrupt ({problem})")
    if skipped:
        log.warning("skipped %s; no complete checkpoint left", "; ".join(skipped))
    return None
