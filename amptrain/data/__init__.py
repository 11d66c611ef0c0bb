"""Token data: sources, packing into fixed blocks, a seeded split and a seeded batch order.

Sources are Python tensors or lists, data files in the formats of `formats.SUPPORTED` (text,
JSONL, JSON, CSV, TSV, Parquet, `datasets` folders, `.bin` token files) and folders of them,
instruction and chat records among them (`examples`: the prompt read, the completion scored),
and the built-in corpus: the source text of a fixed selection of the running Python's standard
library (real text, present on every machine, no download).

Everything here ends as `Blocks`, whose rows are read as int64 `[B, T]` batches.
"""

from __future__ import annotations

from amptrain.data.examples import ExampleFields
from amptrain.data.formats import SUPPORTED
from amptrain.data.packing import (
    Blocks,
    as_blocks,
    batches,
    check_batch_size,
    check_ids,
    epoch_order,
    pack,
    split,
)
from amptrain.data.sources import (
    BUILTIN_MODULES,
    builtin_corpus_files,
    held_out_source,
    load,
    read_text,
    source_files,
    text_files,
)
from amptrain.data.tokenizers import BYTE_VOCAB, ByteTokenizer, JsonTokenizer

__all__ = [
    "BUILTIN_MODULES", "BYTE_VOCAB", "SUPPORTED", "Blocks", "ByteTokenizer", "ExampleFields",
    "JsonTokenizer",
    "as_blocks", "batches", "builtin_corpus_files", "check_batch_size", "check_ids",
    "epoch_order", "held_out_source", "load", "pack", "read_text", "source_files", "split",
    "text_files",
]  # fmt: skip
