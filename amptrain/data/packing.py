"""Blocks of tokens: packing, Python data as blocks, a seeded split and a seeded batch order.

Labels equal the inputs except at padding, where they hold `ignore_index`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from amptrain.adapter import IGNORE_INDEX, check_token_range
from amptrain.errors import DataError


class Blocks:
    """Fixed-length token blocks: row i is `inputs[i]`, with `labels[i]` as its labels.

    The tokens are stored compactly (uint8 for bytes, uint16/int32 for a tokenizer's ids, a
    uint16/uint32 memory map for a token file) and converted to int64 one batch at a time, so
    a corpus costs its token count times 1-4 bytes, not 16. Labels equal to the inputs are not
    stored twice, and `subset` keeps an index instead of copying rows, so a split copies no
    tokens.

    Args:
        inputs: `[M, T]` stored rows, any integer dtype.
        labels: `[M, T]` labels, or None when they equal the inputs.
        name: What the data is called in messages.
        rows: The stored rows this object holds, in order; None for all of them.
        max_id: Every stored id lies in [0, max_id], when known on load.
        about: What loading found, for the run's record (instruction and chat data: the
            examples, the skipped records, the layout); kept by `subset`.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor | None = None,
        name: str = "data",
        rows: torch.Tensor | None = None,
        max_id: int | None = None,
        about: dict | None = None,
    ) -> None:
        self.store, self.name, self.rows = inputs, name, rows
        self.store_labels = None if labels is inputs else labels
        self.max_id = max_id  # when known (found on load), every stored id is in [0, max_id]
        self.about = about

    def __len__(self) -> int:
        return self.store.size(0) if self.rows is None else self.rows.numel()

    @property
    def context(self) -> int:
        """T, the length of every block."""
        return self.store.size(1)

    @property
    def inputs(self) -> torch.Tensor:
        """All rows as one int64 `[N, T]` tensor (the stored one itself when it is that)."""
        if self.rows is None and self.store.dtype == torch.long:
            return self.store
        return self.store[slice(None) if self.rows is None else self.rows].long()

    @property
    def labels(self) -> torch.Tensor:
        """All labels as one int64 `[N, T]` tensor."""
        if self.rows is None and self.store_labels is not None:
            return self.store_labels.long()
        return self.take(slice(None))[1]

    def take(self, index: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(inputs, labels)` of the rows at `index` (a slice or an index tensor), as int64."""
        at = index if self.rows is None else self.rows[index]
        x = self.store[at].long()
        y = x.clone() if self.store_labels is None else self.store_labels[at].long()
        return x, y

    def subset(self, index: torch.Tensor) -> Blocks:
        """The blocks at `index`, in that order (no tokens are copied)."""
        rows = index if self.rows is None else self.rows[index]
        return Blocks(self.store, self.store_labels, self.name, rows, self.max_id, self.about)

    def chunks(self, tokens: int = 1 << 20) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """`(first_row, inputs, labels)` for consecutive slices of about `tokens` ids, as int64."""
        rows = max(1, tokens // self.context)
        for first in range(0, len(self), rows):
            yield (first, *self.take(slice(first, first + rows)))


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
    return Blocks(stream[: n_blocks * context].view(n_blocks, context), None, name)


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
    return _checked(Blocks(ids, None, name))


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
    if blocks.store.numel() == 0:
        raise DataError(f"{blocks.name} is empty: no tokens to train on")
    if blocks.context < 2:
        raise DataError(
            f"{blocks.name}: blocks of {blocks.context} token cannot train next-token prediction; "
            "need at least 2 tokens per row"
        )
    return blocks


def split(
    blocks: object, val_fraction: float = 0.1, seed: int = 0, context: int | None = None
) -> tuple[Blocks, Blocks]:
    """A seeded random split into train and validation blocks (at least one of each).

    `blocks` is anything `as_blocks` takes (`Blocks`, a `[N, T]` tensor, lists of ids, a dict
    of `input_ids`; a 1-D stream with `context`).

    Raises:
        ValueError: For a `val_fraction` outside (0, 1).
        DataError: For fewer than 2 blocks.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must be between 0 and 1 (e.g. 0.1)")
    blocks = as_blocks(blocks, context)
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
    window: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless seeded batches of `(inputs, labels)`, starting at global batch number `start`.

    Each epoch is a fresh permutation; the last partial batch of an epoch is dropped, so every
    batch has the same shape. Position `start` is reached without replaying earlier batches,
    which makes resuming exact and cheap. With several ranks, global batch b is
    `batch_size * world_size` blocks of the permutation and rank r takes its r-th slice, so
    the ranks together see exactly what one process with the global batch would. Batches come
    in whole windows of `window` (gradient accumulation): an epoch ends where a whole window no
    longer fits, so A micro-batches of B see what one batch of A*B would.
    """
    check_batch_size(blocks, batch_size, world_size)
    n, global_batch = len(blocks), batch_size * world_size
    per_epoch = n // (global_batch * window) * window or n // global_batch
    epoch, index = divmod(start, per_epoch)
    while True:
        order = epoch_order(n, seed, epoch)
        for b in range(index, per_epoch):
            first = b * global_batch + rank * batch_size
            yield blocks.take(order[first : first + batch_size])
        epoch, index = epoch + 1, 0


def check_ids(blocks: Blocks, vocab_size: int, ignore_index: int) -> None:
    """Refuse ids outside `[0, vocab_size)` in the inputs and labels, a chunk of rows at a time.

    Raises:
        DataError: Naming the first bad id, its (row, position) and the vocabulary size.
    """
    if blocks.max_id is not None and blocks.max_id < vocab_size and blocks.store_labels is None:
        return  # ids known to lie in [0, max_id] on load: a scan would find nothing
    for first, x, y in blocks.chunks():
        check_token_range(x, vocab_size, blocks.name, first)
        if blocks.store_labels is not None:
            y = y.masked_fill(y == ignore_index, 0)
            check_token_range(y, vocab_size, f"{blocks.name} labels", first)
