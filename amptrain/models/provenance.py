"""Where a run's model came from: `base.json`, so a run directory can move and still load.

A run fine-tuned from a model file, a Hugging Face directory or another run needs that base to
rebuild its architecture (its own weights replace the base's). `record` notes the base by its
absolute path and a sha256 of the files that define it (a model file; a Hugging Face
directory's config and weights; a run's config and weights); `base_source` gives the source to
build from wherever the run now is, and refuses in one line when the base is gone or changed.
A run whose model is the built-in tiny-gpt, or that carries its own `hf/` export, needs no base.

What identifies the base is its content: the sha256 over the names and bytes of those files,
the same whichever way it is computed. The path only says where to find it. The digest is
computed once per version of the files and then remembered (see `digests`), so starting or
loading a run from a multi-GB base does not read it all again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amptrain.errors import ModelError
from amptrain.models.digests import files_digest

BASE_FILE = "base.json"
_HF_FILES = ("config.json", "*.safetensors", "*.bin", "*.safetensors.index.json")
_RUN_FILES = ("config.json", "model.safetensors", "model.pt")


def record(source: str) -> dict[str, Any]:
    """What `base.json` holds for the model source `source` (as `--model` gave it)."""
    from amptrain.models.loading import BUILTIN
    from amptrain.models.trained import run_config

    if source == BUILTIN:
        return {"model": source, "kind": "builtin"}
    path, symbol = _split(source)
    kind = "file" if path.suffix == ".py" else "run" if run_config(path) else "hf"
    absolute = path.resolve()
    files = _files(absolute, kind)
    return {
        "model": source,
        "kind": kind,
        "path": str(absolute),
        "symbol": symbol,
        "files": [f.name for f in files],
        "sha256": files_digest(files),
    }


def base_source(run_dir: str | Path, saved: dict[str, Any]) -> str:
    """The model source to build a run's architecture from, checked to be the one it used.

    Args:
        run_dir: The run directory.
        saved: Its config.json.

    Raises:
        ModelError: If the recorded base is gone or its files changed, naming its path.
    """
    path = Path(run_dir) / BASE_FILE
    if not path.is_file():  # a run of an earlier version: its source as given, from here
        return _old_source(run_dir, saved["model"])
    base = json.loads(path.read_text(encoding="utf-8"))
    if base["kind"] == "builtin":
        return base["model"]
    where = Path(base["path"])
    fix = (f"put it back at {where}, or load these weights into a model you give: "
           f"--model SOURCE --init-from {run_dir}")  # fmt: skip
    if not where.exists():
        raise ModelError(f"{run_dir} was trained from {where}, which is gone; {fix}")
    if files_digest(_files(where, base["kind"])) != base["sha256"]:
        raise ModelError(
            f"{run_dir} was trained from {where}, whose files changed since (sha256 differs), "
            f"so its architecture may no longer fit these weights; {fix}"
        )
    return f"{where}:{base['symbol']}" if base.get("symbol") else str(where)


def _old_source(run_dir: str | Path, source: str) -> str:
    from amptrain.models.loading import BUILTIN

    path, _ = _split(source)
    if source != BUILTIN and not path.exists():
        raise ModelError(
            f"{run_dir} was trained from {source!r}, a path relative to where it ran, which is "
            "not found from here; run the command from that folder, or pass the model with "
            f"--model SOURCE --init-from {run_dir}"
        )
    return source


def _split(source: str) -> tuple[Path, str | None]:
    """`file.py:Name` -> (file.py, Name); anything else -> (path, None)."""
    path, _, symbol = source.rpartition(":")
    if path.endswith(".py") and symbol:
        return Path(path), symbol
    return Path(source), None


def _files(path: Path, kind: str) -> list[Path]:
    """The files whose content defines the base, in a stable order."""
    if kind == "file":
        return [path] if path.is_file() else []
    patterns = _RUN_FILES if kind == "run" else _HF_FILES
    return sorted({f for pattern in patterns for f in path.glob(pattern) if f.is_file()})
