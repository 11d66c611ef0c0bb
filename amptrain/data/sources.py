"""Load a named source into blocks: the built-in corpus, a data file, a folder, a `.bin` file.

A data file is in any supported format (`formats.SUPPORTED`), a folder holds such files or
is a `datasets` save_to_disk folder, and a `.bin` file holds pre-tokenized ids.

Text is streamed: each file is read and tokenized in pieces into a compact array, which is then
cut into blocks without a copy. A `.bin` file is memory-mapped. Files are joined by a newline,
as records within a file are.
"""

from __future__ import annotations

import gzip
import logging
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from amptrain.data import examples, formats, readers, tokens
from amptrain.data.packing import Blocks, pack
from amptrain.data.tokenizers import ByteTokenizer, JsonTokenizer
from amptrain.errors import DataError

log = logging.getLogger("amptrain")

# The built-in corpus: these standard-library modules, in this order (about 1.2 MB of text).
BUILTIN_MODULES = (
    "argparse.py", "collections/__init__.py", "dataclasses.py", "difflib.py", "enum.py",
    "functools.py", "inspect.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "pathlib.py", "pickle.py", "random.py", "shutil.py", "statistics.py", "string.py",
    "subprocess.py", "textwrap.py", "threading.py", "typing.py", "unittest/case.py",
)  # fmt: skip


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
    """The files a `--data` path reads, sorted (a folder's unusable files skipped, and logged)."""
    return [f.path for f in formats.resolve(source)]


def load(
    source: str | Path | None,
    context: int,
    tokenizer: ByteTokenizer | JsonTokenizer | str | Path | None = None,
    text_field: str = "text",
    data_dtype: str = "uint16",
    fields: examples.ExampleFields | None = None,
    ignore_index: int = -100,
) -> Blocks:
    """Load a named source into blocks: `None` or `"builtin"` for the built-in corpus, else a path.

    Records with a prompt and a completion, or with chat messages, and no text field are
    instruction or chat examples (`examples`): one example a row, the prompt not scored.

    Args:
        source: `"builtin"`, a file in a supported format (see `formats.SUPPORTED`), or a folder.
        context: Tokens per block.
        tokenizer: A tokenizer, or the path of a `tokenizer.json` (or of the folder holding
            it); default UTF-8 bytes. Not used for a `.bin` token file.
        text_field: The field of JSONL/JSON/CSV/TSV/Parquet/`datasets` records that holds text.
        data_dtype: `uint16` or `uint32`, the ids of a header-less `.bin` token file.
        fields: Where instruction and chat records keep their parts (default: TRL's names).
        ignore_index: The label of positions that are not scored.

    Raises:
        DataError: For a file in no supported format, a missing text field, or too few tokens.
    """
    if isinstance(tokenizer, (str, Path)):
        tokenizer = JsonTokenizer(tokenizer)
    tokenizer = tokenizer or ByteTokenizer()
    if source is None or str(source) == "builtin":
        files, name = [formats.DataFile(f, "text") for f in builtin_corpus_files()], None
    else:
        files, name = formats.resolve(source), str(source)
    if files[0].kind == "tokens":
        return token_file(files[0].path, context, data_dtype)
    fields = fields or examples.ExampleFields()
    kind = examples.record_kind(files[0], text_field, fields)
    if kind != "text":
        if tokenizer.eos_id is None:
            raise DataError(f"--data {source} holds {kind} examples, which end in an "
                            f"end-of-sequence token, and the tokenizer {tokenizer.name} names "
                            "none; give it a tokenizer_config.json with an eos_token")  # fmt: skip
        return examples.load_examples(files, kind, context, tokenizer, fields, ignore_index)
    ids = stream(files, tokenizer, text_field)
    blocks = pack(torch.from_numpy(ids), context, name or "the built-in corpus")
    blocks.max_id = int(ids.max())  # a tokenizer's ids are >= 0: fit need not scan them again
    return blocks


def source_files(source: str | Path) -> list[Path]:
    """Every file whose content a `--data` source reads, in a stable order (for its digest)."""
    if str(source) == "builtin":
        return builtin_corpus_files()
    paths = [f.path for f in formats.resolve(source)]
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*")))]
    return [f for f in files if f.is_file()]


def read_text(source: str | Path, text_field: str = "text") -> str:
    """The whole text of a source, for work that needs the text itself (a held-out suffix).

    Raises:
        DataError: For a `.bin` token file, which holds ids and no text.
    """
    if str(source) == "builtin":
        files = [formats.DataFile(f, "text") for f in builtin_corpus_files()]
    else:
        files = formats.resolve(source)
    if files[0].kind == "tokens":
        raise DataError(f"--data {source} holds token ids, not text; this needs text data")
    return "".join(_pieces(files, text_field, raw=False))  # type: ignore[arg-type]


def stream(
    files: Sequence[formats.DataFile], tokenizer: ByteTokenizer | JsonTokenizer, text_field: str
) -> np.ndarray:
    """Tokenize files into one compact 1-D array of ids, files joined by a newline."""
    raw = isinstance(tokenizer, ByteTokenizer)
    sizes = [f.path.stat().st_size * (4 if formats.compressed(f.path) else 1) for f in files
             if f.path.is_file()]  # fmt: skip
    capacity = sum(sizes) + len(files)  # bytes bound byte tokens; a .gz's is a guess
    if any(f.kind == "datasets" for f in files):
        capacity += sum(p.stat().st_size for f in files for p in f.path.glob("**/*.arrow"))
    return tokens.encode_pieces(_pieces(files, text_field, raw), tokenizer, capacity,
                                readers.PIECE)  # fmt: skip


def _pieces(files: Sequence[formats.DataFile], text_field: str, raw: bool) -> Iterator[str | bytes]:
    for i, file in enumerate(files):
        if i:
            yield b"\n" if raw else "\n"
        try:
            yield from readers.pieces(file, text_field, raw)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # only its start was checked
            raise DataError(
                f"--data {file.path} is a gzip file cut short or corrupt part-way ({exc}); "
                "compress it again, or download it again"
            ) from None


def token_file(path: Path, context: int, data_dtype: str) -> Blocks:
    """Blocks over a memory-mapped `.bin` token file; its largest id is found up front."""
    array = tokens.open_token_file(path, data_dtype)
    top = tokens.max_id(path, array)
    blocks = pack(torch.from_numpy(array), context, str(path))
    log.info("%s: %s token ids (%s), largest id %s", path, f"{array.size:,}", array.dtype, top)
    return Blocks(blocks.store, None, blocks.name, max_id=top)


def held_out_source(path: str | None) -> str:
    """`--val-data` as a source: a `DatasetDict` folder's held-out split, else the path.

    Raises:
        DataError: For a `DatasetDict` with neither a `validation` nor a `test` split.
    """
    folder = Path(str(path))
    if not (folder / "dataset_dict.json").is_file():
        return str(path)
    for split in ("validation", "test"):
        if (folder / split).is_dir():
            return str(folder / split)
    splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
    raise DataError(f"--val-data {path} holds the splits {splits} and no 'validation' or "
                    "'test' split; pass the held-out split's folder as --val-data")  # fmt: skip
