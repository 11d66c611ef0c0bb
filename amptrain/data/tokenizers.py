"""Tokenizers: UTF-8 bytes (vocabulary 256), or a local Hugging Face `tokenizer.json`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from amptrain.errors import DataError

BYTE_VOCAB = 256


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download or train."""

    vocab_size = BYTE_VOCAB
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
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

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        return self._tok.decode(list(ids))
