"""Rows of packed training windows as a pure function of (seed, row index): random access, no state.

Each epoch visits the documents in a seeded permutation. In `concat` packing the framed documents
of consecutive epochs form one endless token stream; row k is the window of seq_len + 1 tokens that
starts at stream position k * seq_len (windows overlap by one token, so every token is an input
exactly once and every next-token pair is a target exactly once per epoch). In `pad` packing a
row never holds two documents: document d fills ceil((len_d - 1) / seq_len) rows and the last is
padded. In `fit` packing (for SFT) whole documents share rows and are never split: they are packed
once, best fit in decreasing length, into rows of seq_len + 1 tokens (a longer document is cut to
that), and each epoch visits those rows in a seeded order.

With `shuffle_rows` (data.shuffle_rows) the rows of `concat` and `pad` packing are read in a seeded
order instead of one after the other: the rows are cut into blocks of one epoch's worth (ceil of
rows_per_epoch) and row k of block b is row perm_b(k) of that block, perm_b a random-access
permutation (permutation.py) keyed by (seed, stream_id, b). A block holds exactly the rows it held
unshuffled, so every token is still an input once per epoch; only the order within the block
changes, and the rows of one batch come from anywhere in the epoch instead of one stretch of the
document stream (where a long document fills many rows of the same batch). `fit` rows are already
visited in a seeded order per epoch.

A token's target counts in the loss when it belongs to the same document as its input and its
document's target mask (see documents.py) allows it.

Positions count from 0 at each document start and also at the first token of a row that
continues a document from the previous row (attention never sees across rows).
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from plamo_jax.data import batch
from plamo_jax.data.documents import TokenDocuments
from plamo_jax.data.lru import LruCache
from plamo_jax.data.permutation import IndexPermutation, derive_key
from plamo_jax.errors import DataError

PACKING_CHOICES = ("concat", "pad", "fit")
_EPOCH_CACHE_SIZE = 3
_ROW_ORDER_KEY = 0x726F7773  # "rows": keeps row orders apart from the documents' epoch orders


def row_arrays(
    window: np.ndarray,
    document_ids: np.ndarray,
    seq_len: int,
    pad_id: int,
    target_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Batch fields from a window of up to seq_len + 1 tokens and the document each token belongs to."""
    real = len(window) - 1
    row = batch.empty_row(seq_len, pad_id)
    input_ids, target_ids, loss_mask = row["input_ids"], row["target_ids"], row["loss_mask"]
    segment_ids, positions = row["segment_ids"], row["positions"]
    if real > 0:
        input_docs = document_ids[:-1]
        input_ids[:real] = window[:-1]
        target_ids[:real] = window[1:]
        loss_mask[:real] = input_docs == document_ids[1:]
        if target_mask is not None:
            loss_mask[:real] *= target_mask[1:]
        starts = np.concatenate([[True], input_docs[1:] != input_docs[:-1]])
        segment_ids[:real] = np.cumsum(starts)
        start_index = np.flatnonzero(starts)
        positions[:real] = np.arange(real) - start_index[segment_ids[:real] - 1]
    return row


class PackedRows:
    """Row `index` of one corpus; depends only on (documents, seq_len, seed, stream_id, options, index)."""

    def __init__(
        self,
        documents: TokenDocuments,
        *,
        seq_len: int,
        seed: int,
        stream_id: int = 0,
        shuffle: bool = True,
        packing: str = "concat",
        pad_id: int = 0,
        shuffle_rows: bool = False,
    ):
        if documents.num_documents == 0:
            raise DataError("the corpus has no documents to pack (every record was empty or skipped?)")
        if packing not in PACKING_CHOICES:
            raise DataError(f"data.packing={packing!r}; expected one of {PACKING_CHOICES}")
        if seq_len < 1:
            raise DataError(f"train.seq_len={seq_len}; expected >= 1")
        if np.any(documents.lengths < 2):
            raise DataError("a framed document has fewer than 2 tokens; documents must be framed with EOS")
        self.documents = documents
        self.seq_len = seq_len
        self.seed = seed
        self.stream_id = stream_id
        self.shuffle = shuffle
        self.packing = packing
        self.pad_id = pad_id
        # Rows a document fills in `pad` packing; its len - 1 (input, target) pairs, seq_len per row.
        self._rows_per_document = np.maximum(1, -(-(documents.lengths - 1) // seq_len))
        if packing == "fit":
            self._fit_rows = fit_documents(documents.lengths, seq_len + 1)
            self.truncated_documents = int(np.count_nonzero(documents.lengths > seq_len + 1))
        else:
            self.truncated_documents = 0
        self._epoch_cache = LruCache(_EPOCH_CACHE_SIZE)
        # Rows per shuffled block: one epoch's worth; fit rows are already visited in a shuffled order.
        self.shuffle_block_rows = math.ceil(self.rows_per_epoch) if shuffle_rows and packing != "fit" else 0
        self._row_orders = LruCache(_EPOCH_CACHE_SIZE)

    @property
    def tokens_per_epoch(self) -> int:
        return self.documents.total_tokens

    @property
    def rows_per_epoch(self) -> float:
        """Rows that cover one epoch (fractional in concat packing, where rows cross epochs)."""
        if self.packing == "concat":
            return self.tokens_per_epoch / self.seq_len
        if self.packing == "fit":
            return float(len(self._fit_rows))
        return float(self._rows_per_document.sum())

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's document order and where each document starts (in tokens or rows)."""
        return self._epoch_cache.get_or_compute(epoch, self._compute_epoch_order)

    def _compute_epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        count = len(self._fit_rows) if self.packing == "fit" else self.documents.num_documents
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.stream_id, epoch]).permutation(count)
        else:
            order = np.arange(count)
        if self.packing == "fit":
            return order, np.arange(count, dtype=np.int64)
        sizes = self.documents.lengths if self.packing == "concat" else self._rows_per_document
        starts = np.concatenate([[0], np.cumsum(sizes[order])[:-1]]).astype(np.int64)
        return order, starts

    def row_in_stream(self, index: int) -> int:
        """The unshuffled row that row `index` reads (itself unless rows are shuffled)."""
        if not self.shuffle_block_rows:
            return index
        block, within = divmod(index, self.shuffle_block_rows)
        order = self._row_orders.get_or_compute(block, self._block_order)
        return block * self.shuffle_block_rows + order(within)

    def _block_order(self, block: int) -> IndexPermutation:
        key = derive_key(self.seed, self.stream_id, _ROW_ORDER_KEY, block)
        return IndexPermutation(self.shuffle_block_rows, key)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if index < 0:
            raise IndexError(f"row index {index} < 0")
        index = self.row_in_stream(index)
        if self.packing == "concat":
            return self._concat_row(index)
        if self.packing == "fit":
            return self._fit_row(index)
        return self._pad_row(index)

    def _target_mask(self, document_index: int, begin: int, end: int) -> np.ndarray | None:
        if not self.documents.has_target_masks:
            return None
        return self.documents.target_mask(document_index)[begin:end]

    def _concat_row(self, index: int) -> dict[str, np.ndarray]:
        epoch_tokens = self.tokens_per_epoch
        count = self.documents.num_documents
        position = index * self.seq_len
        needed = self.seq_len + 1
        pieces, owners, masks = [], [], []
        while needed > 0:
            epoch, offset = divmod(position, epoch_tokens)
            order, starts = self._epoch_order(epoch)
            slot = int(np.searchsorted(starts, offset, side="right")) - 1
            document_index = int(order[slot])
            document = self.documents.document(document_index)
            within = offset - int(starts[slot])
            piece = document[within : within + needed]
            pieces.append(piece)
            masks.append(self._target_mask(document_index, within, within + len(piece)))
            # A document's identity is its slot in the endless stream, so a document met again in a
            # later epoch (or twice in one row of a tiny corpus) is still a new segment.
            owners.append(np.full(len(piece), epoch * count + slot, np.int64))
            position += len(piece)
            needed -= len(piece)
        mask = None if masks[0] is None else np.concatenate(masks)
        return row_arrays(np.concatenate(pieces), np.concatenate(owners), self.seq_len, self.pad_id, mask)

    def _pad_row(self, index: int) -> dict[str, np.ndarray]:
        epoch, within_epoch = divmod(index, int(self._rows_per_document.sum()))
        order, starts = self._epoch_order(epoch)
        slot = int(np.searchsorted(starts, within_epoch, side="right")) - 1
        piece_index = within_epoch - int(starts[slot])
        document_index = int(order[slot])
        document = self.documents.document(document_index)
        begin = piece_index * self.seq_len
        window = document[begin : begin + self.seq_len + 1]
        mask = self._target_mask(document_index, begin, begin + len(window))
        return row_arrays(window, np.zeros(len(window), np.int64), self.seq_len, self.pad_id, mask)

    def _fit_row(self, index: int) -> dict[str, np.ndarray]:
        epoch, within_epoch = divmod(index, len(self._fit_rows))
        order, _ = self._epoch_order(epoch)
        capacity = self.seq_len + 1
        pieces, owners, masks = [], [], []
        for slot, document_index in enumerate(self._fit_rows[int(order[within_epoch])]):
            piece = self.documents.document(int(document_index))[:capacity]
            pieces.append(piece)
            owners.append(np.full(len(piece), slot, np.int64))
            masks.append(self._target_mask(int(document_index), 0, len(piece)))
        mask = None if masks[0] is None else np.concatenate(masks)
        return row_arrays(np.concatenate(pieces), np.concatenate(owners), self.seq_len, self.pad_id, mask)


def fit_documents(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Document indices per row: best fit in decreasing length, each row holding <= capacity tokens.

    A document longer than the capacity fills a row alone (it is cut to the capacity when read).
    """
    clipped = np.minimum(lengths, capacity)
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row) sorted: the best fit is the first that fits
    for document in np.argsort(-clipped, kind="stable"):
        size = int(clipped[document])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            rows.append([int(document)])
            row, left = len(rows) - 1, capacity - size
        else:
            left, row = free.pop(at)
            rows[row].append(int(document))
            left -= size
        if left > 0:
            bisect.insort(free, (left, row))
    return [np.asarray(row, np.int64) for row in rows]
