"""Tokenized documents with random access, held in memory or memory-mapped from shard files.

Documents are stored already framed (optional BOS, then the text's tokens, then EOS), so the
packer never needs to know which tokenizer produced them. A document may carry a target mask (one
byte per token: 1 where predicting that token counts in the loss), as chat documents for SFT do;
documents without one learn every token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from plamo_jax.data.tokenizer import Tokenizer, encode_to_array


class DocumentPart:
    """One flat token array and where its documents lie in it: document i is tokens[starts[i]:ends[i]].

    Built from `offsets` (documents back to back: document i is offsets[i]:offsets[i+1]) or, with
    `DocumentPart.spans`, from separate starts and ends (a corpus whose unusable documents are left
    out without copying its tokens). A part backed by a file is memory-mapped on first use and not
    pickled, so Grain worker processes open their own maps and each process only pages in the windows
    it reads. The file is a `.npy` array, or headerless tokens of `raw_dtype` (a Megatron `.bin`).
    """

    def __init__(
        self,
        offsets: np.ndarray,
        tokens: np.ndarray | None = None,
        tokens_path: Path | None = None,
        target_mask: np.ndarray | None = None,
        raw_dtype: np.dtype | None = None,
    ):
        offsets = np.asarray(offsets, dtype=np.int64)
        self._init(offsets[:-1], offsets[1:], tokens, tokens_path, raw_dtype)
        if target_mask is not None and len(target_mask) != offsets[-1]:
            raise ValueError(f"target mask has {len(target_mask)} entries for {offsets[-1]} tokens")
        self.target_mask = target_mask

    @classmethod
    def spans(cls, starts: np.ndarray, ends: np.ndarray, *, tokens_path: Path,
              raw_dtype: np.dtype | None = None) -> DocumentPart:
        """Documents tokens[starts[i]:ends[i]] of a file, in that order (spans may leave gaps)."""
        part = cls.__new__(cls)
        part._init(np.asarray(starts, np.int64), np.asarray(ends, np.int64), None, tokens_path, raw_dtype)
        part.target_mask = None
        return part

    def _init(self, starts, ends, tokens, tokens_path, raw_dtype) -> None:
        if (tokens is None) == (tokens_path is None):
            raise ValueError("DocumentPart needs exactly one of tokens or tokens_path")
        if len(starts) != len(ends):
            raise ValueError(f"{len(starts)} document starts but {len(ends)} ends")
        self.starts, self.ends = starts, ends
        self._tokens = tokens
        self.tokens_path = tokens_path
        self.raw_dtype = None if raw_dtype is None else np.dtype(raw_dtype)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            if self.raw_dtype is None:
                self._tokens = np.load(self.tokens_path, mmap_mode="r")
            elif self.num_documents:
                self._tokens = np.memmap(self.tokens_path, dtype=self.raw_dtype, mode="r")
            else:
                self._tokens = np.zeros(0, self.raw_dtype)  # an empty file cannot be memory-mapped
        return self._tokens

    @property
    def num_documents(self) -> int:
        return len(self.starts)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.tokens_path is not None:
            state["_tokens"] = None
        return state


class TokenDocuments:
    """Random access to framed documents across parts; `lengths[i]` counts document i's tokens."""

    def __init__(self, parts: list[DocumentPart]):
        parts = [part for part in parts if part.num_documents > 0]
        self.parts = parts
        counts = np.array([part.num_documents for part in parts], dtype=np.int64)
        self._part_starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_documents = int(self._part_starts[-1])
        self.lengths = np.concatenate([part.lengths for part in parts]) if parts else np.zeros(0, np.int64)
        self.total_tokens = int(self.lengths.sum())
        masked = {part.target_mask is not None for part in parts}
        if len(masked) > 1:
            raise ValueError("either every part of a corpus has target masks or none has")
        self.has_target_masks = masked == {True}

    def _locate(self, index: int) -> tuple[DocumentPart, int, int]:
        part_index = int(np.searchsorted(self._part_starts, index, side="right")) - 1
        part = self.parts[part_index]
        local = index - int(self._part_starts[part_index])
        return part, int(part.starts[local]), int(part.ends[local])

    def document(self, index: int) -> np.ndarray:
        part, start, end = self._locate(index)
        return np.asarray(part.tokens[start:end], dtype=np.int32)

    def target_mask(self, index: int) -> np.ndarray:
        """1 where predicting the token counts in the loss (all ones for a document without a mask)."""
        part, start, end = self._locate(index)
        if part.target_mask is None:
            mask = np.ones(end - start, np.uint8)
            mask[0] = 0  # a document's first token has nothing before it to predict from
            return mask
        return np.asarray(part.target_mask[start:end], dtype=np.uint8)


def frame_document(token_ids: np.ndarray, tokenizer: Tokenizer, add_bos: bool) -> np.ndarray:
    pieces = [np.asarray(token_ids, dtype=np.int32), np.array([tokenizer.eos_id], np.int32)]
    if add_bos:
        pieces.insert(0, np.array([tokenizer.bos_id], np.int32))
    return np.concatenate(pieces)


def documents_from_texts(texts: Iterable[str], tokenizer: Tokenizer, add_bos: bool) -> TokenDocuments:
    """Tokenize and frame texts in memory (for small corpora; big ones go through tokenize_corpus)."""
    framed = [frame_document(encode_to_array(tokenizer, text), tokenizer, add_bos) for text in texts]
    return documents_from_token_lists(framed)


def documents_from_token_lists(
    framed: list[np.ndarray], target_masks: list[np.ndarray] | None = None
) -> TokenDocuments:
    if not framed:
        return TokenDocuments([])
    offsets = np.concatenate([[0], np.cumsum([len(doc) for doc in framed])])
    mask = None if target_masks is None else np.concatenate(target_masks).astype(np.uint8)
    return TokenDocuments(
        [DocumentPart(offsets, tokens=np.concatenate(framed).astype(np.int32), target_mask=mask)]
    )
