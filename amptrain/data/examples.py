"""Instruction and chat data: examples whose prompt is read and whose completion is scored.

A data file of records is instruction data when its records have a prompt and a completion
field (`prompt`/`completion` by default, TRL's names) and chat data when they have a
`messages` list of `{"role", "content"}` turns; a `text` field (or `--text-field`) still makes
it plain text. Each example becomes one row of `context` tokens:

- Instruction: the prompt's tokens, then the completion's, then the end-of-sequence token.
- Chat: the turns rendered with the tokenizer's chat template where it has one, else with
  the plain template `chat` documents; each assistant turn (and the end of its turn)
  is the completion, every other turn prompt.

Only completion positions are scored: the prompt's labels are the ignore index, so the loss,
perplexity and accuracy of training and of `eval` are over completion tokens. Examples are
never packed together (one example cannot attend to another): each row holds one example
padded with the end-of-sequence token, its padding ignored. An example longer than the context
is cut from its start (the prompt side; `long_examples="truncate"`) or left out (`"drop"`).
Records without the fields, with an empty completion, or with nothing scored left are counted
and reported with their place in the file; a file where none is usable is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from amptrain.data import chat
from amptrain.data.formats import DataFile
from amptrain.data.packing import Blocks
from amptrain.data.records import records
from amptrain.errors import DataError

log = logging.getLogger("amptrain")


@dataclasses.dataclass(frozen=True)
class ExampleFields:
    """Where an example's parts are in a record, and what to do with long ones."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    long_examples: str = "truncate"


def record_kind(file: DataFile, text_field: str, fields: ExampleFields) -> str:
    """`text`, `instruction` or `chat`: what the first record of `file` holds.

    A file that is not records (plain text, token ids) is `text`. The text field wins over the
    others, so a file with both trains as text, as it did before examples were read.
    """
    if file.kind in ("text", "tokens"):
        return "text"
    for _, record in records(file):
        if not isinstance(record, dict) or text_field in record:
            return "text"
        if fields.messages in record:
            return "chat"
        if fields.prompt in record and fields.completion in record:
            return "instruction"
        return "text"  # the text reader names the missing field and the ones there
    return "text"


def load_examples(
    files: Sequence[DataFile],
    kind: str,
    context: int,
    tokenizer: Any,
    fields: ExampleFields,
    ignore_index: int = -100,
) -> Blocks:
    """Every usable example of `files` as one padded row; the prompt's labels ignored.

    Raises:
        DataError: When no record of the files is a usable example, with the reasons counted.
    """
    name = str(files[0].path) if len(files) == 1 else f"{files[0].path.parent}"
    skipped: Counter[str] = Counter()
    where_first: dict[str, str] = {}
    rows: list[tuple[list[int], list[bool]]] = []
    truncated = 0
    for file in files:
        for where, record in records(file):
            try:
                segments = _segments(record, kind, tokenizer, fields)
                ids, scored, cut = _fit(segments, context, fields.long_examples)
            except _Unusable as exc:
                skipped[exc.reason] += 1
                where_first.setdefault(exc.reason, f"{file.path}{where}")
                continue
            truncated += cut
            rows.append((ids, scored))
    reasons = "; ".join(f"{n} {why} (first: {where_first[why]})" for why, n in skipped.items())
    if not rows:
        raise DataError(f"{name} has no usable {kind} example ({reasons or 'no records'}); "
                        f"{_expected(kind, fields)}")  # fmt: skip
    blocks = _padded(rows, context, tokenizer, ignore_index, name)
    scored = int((blocks.store_labels[:, 1:] != ignore_index).sum())
    blocks.about = {"kind": kind, "examples": len(rows), "skipped": dict(skipped),
                    "cut_from_the_prompt_side": truncated,
                    "layout": f"one example per row, padded to {context} tokens",
                    "scored_fraction": scored / max(1, len(rows) * (context - 1))}  # fmt: skip
    log.info("%s data %s: %d examples, one per row padded to %d tokens (%.0f%% of positions "
             "scored: completions only)%s%s", kind, name, len(rows), context,
             100 * scored / max(1, len(rows) * (context - 1)),
             f"; {truncated} cut from the prompt side to fit" if truncated else "",
             f"; skipped {reasons}" if reasons else "")  # fmt: skip
    return blocks


def _expected(kind: str, fields: ExampleFields) -> str:
    if kind == "chat":
        return (f"a chat record has a {fields.messages!r} list of {{'role', 'content'}} turns "
                "with at least one non-empty assistant turn")  # fmt: skip
    return (f"an instruction record has text fields {fields.prompt!r} and a non-empty "
            f"{fields.completion!r} (--prompt-field, --completion-field)")  # fmt: skip


class _Unusable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _segments(
    record: Any, kind: str, tokenizer: Any, fields: ExampleFields
) -> list[tuple[list[int], bool]]:
    """`(ids, scored)` pieces of one record, in order."""
    if not isinstance(record, dict):
        raise _Unusable("records that are not objects")
    if kind == "chat":
        messages = record.get(fields.messages)
        problem = chat.check_messages(messages)
        if problem:
            raise _Unusable(problem)
        try:
            return chat.segments(messages, tokenizer)
        except chat.TemplateError as exc:
            raise _Unusable(str(exc)) from None
    prompt, completion = record.get(fields.prompt), record.get(fields.completion)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        missing = fields.prompt if not isinstance(prompt, str) else fields.completion
        raise _Unusable(f"without a text {missing!r}")
    if not completion.strip():
        raise _Unusable("with an empty completion")
    return [(chat.bos(tokenizer) + tokenizer.encode(prompt, special=False), False),
            (tokenizer.encode(completion, special=False) + [tokenizer.eos_id], True)]  # fmt: skip


def _fit(
    segments: Iterable[tuple[list[int], bool]], context: int, long_examples: str
) -> tuple[list[int], list[bool], int]:
    """The example's ids and which are scored, cut to `context` from the start; 1 if cut."""
    ids = [i for piece, _ in segments for i in piece]
    scored = [s for piece, flag in segments for s in [flag] * len(piece)]
    cut = 0
    if len(ids) > context:
        if long_examples == "drop":
            raise _Unusable(f"longer than the context ({context} tokens; left out as asked)")
        ids, scored, cut = ids[-context:], scored[-context:], 1
    if not any(scored[1:]):  # position 0 is never a target
        raise _Unusable("with no completion token left inside the context")
    return ids, scored, cut


def _padded(
    rows: list[tuple[list[int], list[bool]]],
    context: int,
    tokenizer: Any,
    ignore_index: int,
    name: str,
) -> Blocks:
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    inputs = torch.full((len(rows), context), pad, dtype=torch.long)
    labels = torch.full((len(rows), context), ignore_index, dtype=torch.long)
    for r, (ids, scored) in enumerate(rows):
        row = torch.tensor(ids, dtype=torch.long)
        inputs[r, : len(ids)] = row
        labels[r, : len(ids)] = row.masked_fill(~torch.tensor(scored), ignore_index)
    return Blocks(inputs, labels, name, max_id=None)
