"""Token data: sources, packing into fixed blocks, a seeded split and a seeded batch order.

Sources are Python tensors or lists, text files and folders, and the built-in corpus.

Everything here ends as `Blocks`: `inputs` and `labels`, both `[N, T]` int64. Labels equal
`inputs` except at padding, where they hold `ignore_index`. The built-in corpus is the source
text of a fixed selection of the running Python's standard library: real text, present on every
machine, no download.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from amptrain.adapter import IGNORE_INDEX
from amptrain.errors import DataError

BYTE_VOCAB = 256

# The built-in corpus: these standard-library modules, in this order (about 1.2 MB of text).
BUILTIN_MODULES = (
    "argparse.py", "collections/__init__.py", "dataclasses.py", "difflib.py", "enum.py",
    "functools.py", "inspect.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "pathlib.py", "pickle.py", "random.py", "shutil.py", "statistics.py", "string.py",
    "subprocess.py", "textwrap.py", "threading.py", "typing.py", "unittest/case.py",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Fixed-length token blocks: `inputs` and `labels`, each `[N, T]` int64."""

    inputs: torch.Tensor
    labels: torch.Tensor
    name: str = "data"

    def __len__(self) -> int:
        return self.inputs.size(0)

    @property
    def context(self) -> int:
        """T, the length of every block."""
        return self.inputs.size(1)

    def subset(self, index: torch.Tensor) -> Blocks:
        """The blocks at `index`, in that order."""
        return Blocks(self.inputs[index], self.labels[index], self.name)


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
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.name = str(path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        return self._tok.decode(list(ids))


def builtin_corpus_files() -> list[Path]:
    """The standard-library files of the built-in corpus, checked to exist."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / name for name in BUILTIN_MODULES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"the built-in corpus needs the standard library's sources, and {missing[0]} is "
            "missing (this Python ships compiled modules only); pass --data with text files"
        )
    return files


def text_files(source: str | Path) -> list[Path]:
    """The text files of a file or folder: every non-hidden file without NUL bytes, sorted."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if path.is_file():
        return [path]
    files = [
        p
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    files = [p for p in files if b"\0" not in p.read_bytes()[:8192]]
    if not files:
        raise DataError(f"no text files under {path}")
    return files


def tokenize_files(files: Sequence[Path], tokenizer: ByteTokenizer | JsonTokenizer) -> torch.Tensor:
    """Read and tokenize files into one stream of token ids, files joined by a newline."""
    if isinstance(tokenizer, ByteTokenizer):
        raw = b"\n".join(f.read_bytes() for f in files)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else _empty()
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return torch.tensor(tokenizer.encode(text), dtype=torch.long) if text else _empty()


def _empty() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


def pack(stream: torch.Tensor, context: int, name: str) -> Blocks:
    """Cut a 1-D token stream into non-overlapping blocks of `context` tokens (the tail is dropped).

    Raises:
        DataError: If the stream is empty or shorter than two blocks (one to train, one to
            validate); the message gives the token count and the fix.
    """
    n_tokens = stream.numel()
    if n_tokens == 0:
        raise DataError(f"{name} is empty: no tokens to train on")
    n_blocks = n_tokens // context
    if n_blocks < 2:
        raise DataError(
            f"{name} has {n_tokens} tokens, fewer than two blocks of context {context} "
            f"(one to train, one to validate; {2 * context} tokens); add text or lower --context"
        )
    inputs = stream[: n_blocks * context].view(n_blocks, context).clone()
    return Blocks(inputs, inputs.clone(), name)


def as_blocks(
    data: object, context: int | None = None, name: str = "data", labels_shifted: bool = False
) -> Blocks:
    """Turn Python data into `Blocks`.

    Accepts `Blocks`; a 2-D integer tensor `[N, T]` (rows are blocks); a 1-D integer tensor
    (a token stream, packed into blocks of `context`); a list of token-id lists (padded to the
    longest with token 0, padding ignored by the loss); or a dict with `input_ids` and optional
    `labels`. Labels are aligned with the inputs (amptrain shifts them); with
    `labels_shifted=True` they are taken as next-token targets and re-aligned, the last
    target of each row being dropped.

    Raises:
        TypeError: For non-integer tensors or unsupported types, naming the type or dtype.
        DataError: For empty data or mismatched shapes.
    """
    if isinstance(data, Blocks):
        return data
    if isinstance(data, dict):
        if "input_ids" not in data:
            raise DataError(f"{name}: a dict of data needs an 'input_ids' key; got {sorted(data)}")
        inputs = _int_tensor(data["input_ids"], f"{name}['input_ids']")
        labels = _int_tensor(data.get("labels", inputs), f"{name}['labels']")
        if labels.shape != inputs.shape:
            raise DataError(
                f"{name}: labels shape {list(labels.shape)} != input_ids shape {list(inputs.shape)}"
            )
        if labels_shifted:
            labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], 1)
        elif "labels" in data:
            _refuse_shifted_labels(inputs, labels, name)
        return _checked(Blocks(inputs, labels, name))
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple)):
        return _checked(_pad_rows(data, name))
    ids = _int_tensor(data, name)
    if ids.dim() == 1:
        if context is None:
            raise DataError(f"{name} is a 1-D token stream; pass context= to cut it into blocks")
        return pack(ids, context, name)
    return _checked(Blocks(ids, ids.clone(), name))


def _refuse_shifted_labels(inputs: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    """Refuse labels that are the inputs moved left by one.

    Shifting them again would train the model to predict two tokens ahead, in silence.
    """
    x, y = inputs[:64], labels[:64]  # the first rows decide, as a first batch would
    if x.dim() != 2 or x.size(1) < 2:
        return
    known = y[:, :-1] != IGNORE_INDEX
    shifted = bool(known.any()) and bool((y[:, :-1] == x[:, 1:])[known].all())
    if shifted and not torch.equal(x, y):
        raise DataError(
            f"{name}: labels are the input_ids shifted left by one (labels[:, t] == "
            "input_ids[:, t+1]), but amptrain shifts labels itself, so the model would learn "
            "to predict two tokens ahead; pass labels equal to input_ids, or labels_shifted=True "
            "to use them as next-token targets"
        )


def _int_tensor(value: object, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        if not isinstance(value, (list, tuple)):
            raise TypeError(
                f"{what}: expected token ids as a tensor or list, got {type(value).__name__}"
            )
        value = torch.tensor(value)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{what}: token ids must be an integer tensor, got dtype {value.dtype}")
    if value.dim() not in (1, 2):
        raise DataError(f"{what}: expected shape [N, T] or [T], got {list(value.shape)}")
    return value.long()


def _pad_rows(rows: Sequence[Sequence[int]], name: str) -> Blocks:
    width = max(len(r) for r in rows)
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        inputs[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        labels[i, : len(row)] = inputs[i, : len(row)]
    return Blocks(inputs, labels, name)


def _checked(blocks: Blocks) -> Blocks:
    if blocks.inputs.numel() == 0:
        raise DataError(f"{blocks.name} is empty: no tokens to train on")
    if blocks.context < 2:
        raise DataError(
            f"{blocks.name}: blocks of {blocks.context} token cannot train next-token prediction; "
            "need at least 2 tokens per row"
        )
    return blocks


def split(blocks: Blocks, val_fraction: float, seed: int) -> tuple[Blocks, Blocks]:
    """A seeded random split into train and validation blocks (at least one of each)."""
    n = len(blocks)
    if n < 2:
        raise DataError(f"{blocks.name} has {n} block; need at least 2 to split off validation")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return blocks.subset(order[n_val:]), blocks.subset(order[:n_val])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled block order of one epoch; a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def check_batch_size(blocks: Blocks, batch_size: int, world_size: int = 1) -> None:
    """Refuse a global batch larger than the blocks, which could never fill one batch.

    Raises:
        DataError: Naming the batch size, the processes and the number of blocks.
    """
    if batch_size * world_size > len(blocks):
        raise DataError(
            f"batch_size={batch_size} x {world_size} process(es) is larger than the "
            f"{len(blocks)} training blocks of {blocks.name}; lower --batch-size, or add data"
        )


def batches(
    blocks: Blocks,
    batch_size: int,
    seed: int,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless seeded batches of `(inputs, labels)`, starting at global batch number `start`.

    Each epoch is a fresh permutation; the last partial batch of an epoch is dropped, so every
    batch has the same shape. Position `start` is reached without replaying earlier batches,
    which makes resuming exact and cheap. With several ranks, global batch b is
    `batch_size * world_size` blocks of the permutation and rank r takes its r-th slice, so
    the ranks together see exactly what one process with the global batch would.
    """
    check_batch_size(blocks, batch_size, world_size)
    n, global_batch = len(blocks), batch_size * world_size
    per_epoch = n // global_batch
    epoch, index = divmod(start, per_epoch)
    while True:
        order = epoch_order(n, seed, epoch)
        for b in range(index, per_epoch):
            first = b * global_batch + rank * batch_size
            idx = order[first : first + batch_size]
            yield blocks.inputs[idx], blocks.labels[idx]
        epoch, index = epoch + 1, 0


def load(
    source: str | Path | None,
    context: int,
    tokenizer: ByteTokenizer | JsonTokenizer | None = None,
) -> Blocks:
    """Load a named source into blocks: `None` or `"builtin"` for the built-in corpus, else a path.

    Args:
        source: `"builtin"`, a text file, or a folder of text files.
        context: Tokens per block.
        tokenizer: Defaults to UTF-8 bytes.
    """
    tokenizer = tokenizer or ByteTokenizer()
    if source is None or str(source) == "builtin":
        files, name = builtin_corpus_files(), "the built-in corpus"
    else:
        files, name = text_files(source), str(source)
    return pack(tokenize_files(files, tokenizer), context, name)
