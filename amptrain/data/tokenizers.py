"""Tokenizers: UTF-8 bytes (vocabulary 256), or a local Hugging Face `tokenizer.json`.

Each knows its end-of-sequence id (`eos_id`), which closes an instruction or chat example and
stops generation, and its chat template (`chat_template`, None when it has none):

- UTF-8 bytes end a sequence with the NUL byte (id 0), which text never holds (a data file
  with NUL bytes is refused as binary); they have no chat template.
- A `tokenizer.json` takes both from the `tokenizer_config.json` beside it (`eos_token`,
  `chat_template`, or a `chat_template.jinja` file), as a Hugging Face model directory and a
  run directory hold them; a bare `tokenizer.json` ends a sequence with the first of
  `EOS_NAMES` its vocabulary has.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amptrain.errors import DataError

log = logging.getLogger("amptrain")

BYTE_VOCAB = 256
SETTINGS_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
"""The files beside a tokenizer.json that hold its special tokens and chat template."""
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
"""End-of-sequence tokens of common vocabularies, for a tokenizer.json with no config beside."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download or train."""

    vocab_size = BYTE_VOCAB
    name = "bytes"
    eos_id = 0
    eos_token = "\0"
    stop_ids = frozenset({0})
    bos_id = None
    bos_token = None
    chat_template = None

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text` (`special` is there for the other tokenizer's sake)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        """The text of token ids; bytes that are not valid UTF-8 become U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A local Hugging Face `tokenizer.json` (needs the `hf` extra)."""

    def __init__(self, path: str | Path) -> None:
        from amptrain._imports import requires

        requires("transformers", "hf", f"--tokenizer {path}", "leave it out for byte tokens")
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception
            raise DataError(
                f"--tokenizer {path} is not a tokenizer.json the tokenizers library reads "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); give the "
                "tokenizer.json a Hugging Face model ships, or leave --tokenizer out for bytes"
            ) from None
        self.vocab_size = self._tok.get_vocab_size()
        self.name = str(path)
        self.path = path
        settings = _settings(path.parent)
        eos = _token_text(settings.get("eos_token"))
        if eos is None:  # a bare tokenizer.json: the end-of-text token its vocabulary names
            eos = next((t for t in EOS_NAMES if self._tok.token_to_id(t) is not None), None)
        self.eos_token = eos
        self.eos_id = None if eos is None else self._tok.token_to_id(eos)
        self.bos_token = _token_text(settings.get("bos_token"))
        self.bos_id = None if self.bos_token is None else self._tok.token_to_id(self.bos_token)
        self.chat_template = _chat_template(path.parent, settings)
        ends = {self._tok.token_to_id(t) for t in EOS_NAMES} | {self.eos_id}
        self.stop_ids = frozenset(i for i in ends if i is not None)
        """Ids that end generation: the EOS and the vocabulary's other end-of-turn tokens."""

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; `special=False` adds no BOS/EOS of the tokenizer's own."""
        return self._tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        """The text of token ids; `special=True` keeps special tokens such as `</s>`."""
        return self._tok.decode(list(ids), skip_special_tokens=not special)


def _settings(folder: Path) -> dict[str, Any]:
    """`tokenizer_config.json` beside the tokenizer (an empty dict where it has none)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        log.warning("%s not read (%s): no end-of-sequence token or chat template from it",
                    path, type(exc).__name__)  # fmt: skip
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _token_text(token: object) -> str | None:
    """A special token as written: a string, or an added token's `{"content": ...}`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _chat_template(folder: Path, settings: dict[str, Any]) -> str | None:
    """The tokenizer's default chat template: `chat_template.jinja`, else its config's."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None
