"""Run directories: the one writer of their folders and config.json, and atomic writes.

Every file amptrain writes whole goes to a temporary file in the same directory, is flushed and
fsynced, then renamed over the target, so a crash leaves the old file or the new one, never half
of one. Streams (metrics.jsonl, metrics.csv) are appended and flushed line by line instead.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from amptrain.errors import ConfigError
from amptrain.runs import weights_file


def create_run_dir(root: str | Path, command: str) -> Path:
    """Create `root/<command>-<YYYYmmdd-HHMMSS>` (with a numeric suffix if it exists)."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", command):
        raise ValueError(f"run command name {command!r} must be lowercase letters, digits, - or _")
    root = make_dirs(root)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = root / (f"{command}-{stamp}" + (f"-{n}" if n else ""))
        try:
            path.mkdir(mode=0o755)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a new run directory under {root}")


def make_dirs(path: str | Path) -> Path:
    """`mkdir -p` with mode 755 for every folder it creates, whatever the umask's looseness.

    (`Path.mkdir(parents=True, mode=...)` gives the mode to the last folder only.)
    """
    path = check_folder(path)
    for folder in [*reversed(path.parents), path]:
        if not folder.is_dir():
            folder.mkdir(mode=0o755, exist_ok=True)
    return path


def check_folder(path: str | Path, flag: str = "--out") -> Path:
    """Refuse a folder path that is, or lies under, an existing file; it can never be created.

    Raises:
        ConfigError: Naming the file in the way.
    """
    path = Path(path)
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            raise ConfigError(
                f"{flag} {path}: {part} is a file, not a folder; give a folder for the run "
                "directories (it is created if missing)"
            )
    return path


def private_file(path: str | Path) -> Path:
    """Create `path` empty, readable by its owner only, unless it exists (a study's database).

    The folders above it are created as `make_dirs` does.
    """
    path = Path(path)
    make_dirs(path.parent)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
    return path


def atomic_write_bytes(path: str | Path, payload: bytes | Callable[[Any], None]) -> Path:
    """Write `payload` to `path` atomically (temporary file in the same directory, then rename).

    `payload` is the bytes, or a function that writes them to the file object it is given (a
    state streamed by `torch.save`, never whole in memory).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # 0o644 like the run folder's 0o755: fixed modes, whatever a loose umask allows.
        with open(os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644), "wb") as f:
            payload(f) if callable(payload) else f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_TEMPORARY = re.compile(r"\..+\.tmp(-\d+|\.png)")
"""What `atomic_write_bytes`, `hf_export` and `plotting.save_figure` write before the rename."""


def clean_temporaries(run_dir: str | Path) -> list[str]:
    """Remove what a killed process left half-written in `run_dir` (call it holding the lock).

    Returns:
        The names removed.
    """
    removed = []
    for path in Path(run_dir).iterdir():
        if _TEMPORARY.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(True)
            removed.append(path.name)
    return sorted(removed)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically; non-finite floats become null."""
    text = json.dumps(_finite_or_none(obj), indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` atomically; keep to tensors and plain containers so `weights_only` loads it."""
    return atomic_write_bytes(path, lambda file: torch.save(obj, file))


def atomic_safetensors_save(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict as safetensors, atomically.

    safetensors stores each tensor once: a name whose tensor is another's (tied weights, such
    as an output layer that is the embedding) is kept in the metadata as `{name: kept_name}`,
    which `amptrain.models.trained.read_weights` turns back into both names.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()  # compared where it lives: a copy to the CPU is a new storage
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        key = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
               tensor.dtype)  # fmt: skip
        if key in seen and tensor.numel():
            aliases[name] = seen[key]
            continue
        seen[key] = name
        shares = storage in storages  # a view into another tensor
        storages.add(storage)
        kept[name] = tensor.cpu().clone() if shares else tensor.cpu().contiguous()
    metadata = {"format": "pt", **aliases}
    return atomic_write_bytes(path, lambda file: weights_file.write(file, kept, metadata))


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_config(
    run_dir: str | Path, command: str, cfg: Any, settings: dict[str, Any] | None = None
) -> Path:
    """Write `config.json`: enough to rerun the command with `amptrain COMMAND --config`.

    It holds the `TrainConfig` fields (model, data, loop), `command`, the command's own
    settings under the command's name (for example `{"bench": {"steps": 30, ...}}`) and the
    environment it ran in; `--config` reads the first three and ignores the environment.
    """
    payload = {"command": command, **cfg.to_dict()}
    if settings:
        payload[command] = dict(settings)
    payload["environment"] = environment()
    return atomic_write_json(Path(run_dir) / "config.json", payload)


def environment() -> dict[str, Any]:
    """Versions and hardware, so a result can be traced to where it was measured."""
    from amptrain.precision import cpu_bf16_features

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_bf16_features": list(cpu_bf16_features()),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
    return env
