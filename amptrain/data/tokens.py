"""Token ids as compact arrays: text tokenized in pieces, and pre-tokenized `.bin` files.

A tokenized corpus is kept as uint8 (byte tokens), uint16 or int32 (a tokenizer's ids),
never as int64 lists: a 1 GB text costs about 1 GB, not 16. A `.bin` file is memory-mapped,
so its tokens stay on disk until a batch reads them.

`.bin` files are nanoGPT's (`prepare.py` writes `np.uint16` ids with no header, or uint32 for
vocabularies over 65,536) and litgpt's packed files (a 24-byte `LITPKDS` header that states the
dtype). A header-less file has no dtype of its own: `--data-dtype` states it (uint16 by
default, nanoGPT's), and a file that reads like the other width is refused with the fix.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from amptrain.errors import DataError

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_LITGPT_MAGIC, _LITGPT_HEADER = b"LITPKDS", 24
_LITGPT_DTYPES = {1: np.uint8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_SCAN = 1 << 24  # tokens per read when scanning a token file


class TokenBuffer:
    """A growing 1-D array of token ids of one compact dtype."""

    def __init__(self, dtype: type, capacity: int) -> None:
        self.array, self.size = np.empty(max(capacity, 1024), dtype), 0

    def extend(self, ids: np.ndarray | list[int]) -> None:
        """Append ids (they must fit the dtype: the caller chose it from the vocabulary)."""
        n = len(ids)
        if self.size + n > self.array.size:  # grow by half: rare, since capacity is a bound
            grown = np.empty(max(self.size + n, self.array.size * 3 // 2), self.array.dtype)
            grown[: self.size] = self.array[: self.size]
            self.array = grown
        self.array[self.size : self.size + n] = ids
        self.size += n

    def result(self) -> np.ndarray:
        """The ids written so far (a view; untouched capacity costs no memory)."""
        return self.array[: self.size]


def dtype_for(vocab_size: int) -> type:
    """The smallest integer dtype that holds every id of a vocabulary."""
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32


def encode_pieces(
    pieces: Iterable[str | bytes], tokenizer: object, capacity: int, piece: int
) -> np.ndarray:
    """Tokenize text pieces into one compact array.

    Byte tokens are the bytes themselves. Other tokenizers get text cut at line ends in
    pieces of about `piece` characters, so a large file is never one Python string; a
    corpus smaller than a piece is tokenized in one call.
    """
    vocab = tokenizer.vocab_size  # type: ignore[attr-defined]
    raw = vocab == 256 and getattr(tokenizer, "name", "") == "bytes"
    out = TokenBuffer(dtype_for(vocab), capacity if raw else capacity // 2)
    pending: list[str] = []
    pending_size = 0
    for part in pieces:
        if raw:
            data = part if isinstance(part, bytes) else part.encode("utf-8", errors="replace")
            out.extend(np.frombuffer(data, np.uint8))
            continue
        pending.append(part)  # type: ignore[arg-type]
        pending_size += len(part)
        if pending_size >= piece:
            text = "".join(pending)
            cut = text.rfind("\n") + 1 or len(text)
            out.extend(tokenizer.encode(text[:cut]))  # type: ignore[attr-defined]
            pending, pending_size = [text[cut:]], len(text) - cut
    text = "".join(pending)
    if text:
        out.extend(tokenizer.encode(text))  # type: ignore[attr-defined]
    return out.result()


def open_token_file(path: Path, data_dtype: str) -> np.ndarray:
    """Memory-map a `.bin` token file as a 1-D array (copy-on-write: the file is never written).

    Raises:
        DataError: For a size that is not a whole number of tokens, or ids that read like the
            other width; the message names the file and `--data-dtype`.
    """
    with open(path, "rb") as f:
        head = f.read(_LITGPT_HEADER)
    offset, dtype = 0, DTYPES[data_dtype]
    if head.startswith(_LITGPT_MAGIC):
        if len(head) < _LITGPT_HEADER:
            raise DataError(f"{path}: a litgpt token file cut short ({len(head)} bytes, shorter "
                            f"than its {_LITGPT_HEADER}-byte header); write it again")  # fmt: skip
        code = struct.unpack("<B", head[15:16])[0]
        if code not in _LITGPT_DTYPES:
            raise DataError(f"{path}: litgpt token file with dtype code {code}, which is not "
                            "an integer type")  # fmt: skip
        offset, dtype = _LITGPT_HEADER, _LITGPT_DTYPES[code]
    size = path.stat().st_size - offset
    width = np.dtype(dtype).itemsize
    if size % width:
        raise DataError(
            f"--data {path} has {size:,} bytes, not a whole number of {np.dtype(dtype).name} "
            f"tokens ({width} bytes each); check --data-dtype (uint16 or uint32)"
        )
    if size == 0:
        raise DataError(f"{path} is empty: no tokens to train on")
    if not offset and dtype == np.uint16:
        _refuse_uint32_as_uint16(path)
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=(size // width,))


def _refuse_uint32_as_uint16(path: Path) -> None:
    """uint32 ids below 65,536 read as uint16 give a zero at every other position."""
    sample = np.fromfile(path, dtype=np.uint16, count=4096)
    if sample.size >= 128 and not sample[1::2].any() and sample[0::2].any():
        raise DataError(
            f"--data {path} reads as uint16 ids with a zero at every other position: it holds "
            "uint32 ids; pass --data-dtype uint32"
        )


def max_id(path: Path, array: np.ndarray) -> int | None:
    """The largest id of a token file; None if it holds a negative one (litgpt's signed types).

    It is read in chunks, not through the map, which would leave the whole file resident.
    """
    offset = getattr(array, "offset", 0)
    top, bottom = 0, 0
    with open(path, "rb") as f:
        f.seek(offset)
        while (chunk := np.fromfile(f, dtype=array.dtype, count=_SCAN)).size:
            top, bottom = max(top, int(chunk.max())), min(bottom, int(chunk.min()))
    return top if bottom >= 0 else None
