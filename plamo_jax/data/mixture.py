"""Assigning global rows to corpora so that realised token shares match the mixture weights.

Rows are grouped in blocks of `block_rows`; each block holds round(weight * block_rows) rows of
every corpus (largest-remainder rounding), in a seeded order that differs per block. Every row has
seq_len tokens, so token shares equal row shares: within one block they are exact up to rounding
(<= 1 / block_rows), and a corpus' own row counter is a closed form, so the assignment is random
access like the rows themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from plamo_jax.data.lru import LruCache
from plamo_jax.errors import DataError

_BLOCK_CACHE_SIZE = 4


def rows_per_block(weights: Sequence[float], block_rows: int) -> np.ndarray:
    """Largest-remainder apportionment of block_rows rows to the (normalised) weights."""
    weights_array = np.asarray(weights, dtype=np.float64)
    ideal = weights_array / weights_array.sum() * block_rows
    counts = np.floor(ideal).astype(np.int64)
    remainder_order = np.argsort(-(ideal - counts), kind="stable")
    counts[remainder_order[: block_rows - int(counts.sum())]] += 1
    return counts


class MixtureSchedule:
    """Maps a global row index to (corpus index, row index within that corpus)."""

    def __init__(self, weights: Sequence[float], *, seed: int, block_rows: int):
        if not weights:
            raise DataError("data.source names no corpus")
        for weight in weights:
            if not weight > 0:
                raise DataError(f"mixture weight {weight} in data.source must be > 0")
        if block_rows < 1:
            raise DataError(f"data.mixture_block_rows={block_rows}; expected >= 1")
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.seed = seed
        self.block_rows = block_rows
        self.counts = rows_per_block(weights, block_rows)
        if len(weights) > 1 and np.any(self.counts == 0):
            raise DataError(
                f"data.mixture_block_rows={block_rows} gives weight {float(self.weights.min()):.2g} no row; "
                f"expected >= {int(np.ceil(1 / self.weights.min()))}"
            )
        self._cache = LruCache(_BLOCK_CACHE_SIZE)

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        return self._cache.get_or_compute(block, self._compute_block)

    def _compute_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        corpus_of_row = np.repeat(np.arange(len(self.counts)), self.counts)
        corpus_of_row = np.random.default_rng([self.seed, 0x6D6978, block]).permutation(corpus_of_row)
        rank_in_block = np.zeros(self.block_rows, np.int64)
        for corpus in range(len(self.counts)):
            mine = corpus_of_row == corpus
            rank_in_block[mine] = np.arange(int(mine.sum()))
        return corpus_of_row, rank_in_block

    def assign(self, global_row: int) -> tuple[int, int]:
        if len(self.counts) == 1:
            return 0, global_row
        block, within = divmod(global_row, self.block_rows)
        corpus_of_row, rank_in_block = self._block(block)
        corpus = int(corpus_of_row[within])
        return corpus, block * int(self.counts[corpus]) + int(rank_in_block[within])
