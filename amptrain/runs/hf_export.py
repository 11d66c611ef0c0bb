"""The Hugging Face export of a run: `hf/`, loadable with `from_pretrained` from anywhere.

A run whose model is a Hugging Face model (trained from a Hugging Face directory, or from a
run that was) gets `hf/` beside its weights: the model's `save_pretrained` (`config.json`,
`model.safetensors` with tied weights kept tied, `generation_config.json`) and the tokenizer
it trained with (`tokenizer.json`, `tokenizer_config.json` and the special tokens), so that
`AutoModelForCausalLM.from_pretrained(run / "hf")` and `AutoTokenizer.from_pretrained(run /
"hf")` give back the same model and token ids. The folder is written beside the run and renamed
into place, so `hf/` is complete or absent.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger("amptrain")

EXPORT_DIR = "hf"


def is_hf_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (without importing transformers)."""
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(model).__mro__)  # fmt: skip


def export_hf(
    model: nn.Module,
    run_dir: str | Path,
    tokenizer_file: str | None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write `run_dir/hf/` from the trained `model` and the tokenizer.json it trained with.

    Args:
        model: The trained transformers model.
        run_dir: The run directory.
        tokenizer_file: The tokenizer.json the run encoded its data with; None for byte
            tokens, which have no Hugging Face tokenizer (the export then has none).
        state_dict: The weights to write instead of the model's own: under FSDP the full
            tensors gathered on every rank before (the sharded model's own would be gathered
            by this rank alone, which waits forever for the others).

    Returns:
        The `hf/` folder.
    """
    from amptrain.models.loading import quiet_transformers

    run_dir = Path(run_dir)
    target, tmp = run_dir / EXPORT_DIR, run_dir / f".{EXPORT_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            if tokenizer_file is not None:
                _tokenizer(Path(tokenizer_file)).save_pretrained(tmp)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Hugging Face export %s (AutoModelForCausalLM.from_pretrained loads it)", target)
    if tokenizer_file is None:
        log.info("%s has no tokenizer: the run trained on byte tokens (ids 0-255 are the "
                 "UTF-8 bytes)", target)  # fmt: skip
    return target


def _tokenizer(path: Path):
    """The tokenizer of `path` as transformers loads it, with its Hugging Face settings.

    A tokenizer.json beside a `tokenizer_config.json` (a Hugging Face model directory, or a
    run's `hf/`) keeps its special tokens and settings; a bare tokenizer.json is wrapped as is.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for folder in (path.parent, path.parent / EXPORT_DIR):
        if (folder / "tokenizer_config.json").is_file() and (folder / "tokenizer.json").is_file():
            try:
                loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError) as exc:
                log.info("tokenizer settings of %s not usable (%s); exporting %s alone",
                         folder, exc, path)  # fmt: skip
                break
            if loaded(_PROBE)["input_ids"] == _ids(path, _PROBE):  # the same encoding
                return loaded
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


_PROBE = "Hello, world! def f(x):\n    return x ** 2  # 3.14 \u00e9\u00e8 \u4e2d\u6587"


def _ids(path: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).encode(text).ids


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`, replacing an older export (a resumed run)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
