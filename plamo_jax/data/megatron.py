"""Megatron-LM indexed datasets (`PREFIX.bin` / `PREFIX.idx`, MMIDIDX version 1) as a corpus.

Teams that tokenized with Megatron-LM's `tools/preprocess_data.py` train on those files as they are:
`data.source=megatron:PREFIX[:weight]`, or Megatron's blend string `"0.3 PREFIX_A 0.7 PREFIX_B"` as a
data.source entry. Both files are memory-mapped; no token is copied until a row reads its window.

The `.idx` layout (little-endian; shared/specs/megatron_indexed.md):
    magic b"MMIDIDX\\x00\\x00" | <Q version = 1 | <B dtype code | <Q N sequences | <Q D document-index entries
    | int32[N] sequence lengths | int64[N] byte pointers into .bin | int64[D] document indices
A document is the sequences document_indices[k]:document_indices[k+1] (several with
`--split-sentences`, else one); its tokens are read as written (with `--append-eod` each ends with
EOD; no BOS/EOS is added). Documents of fewer than two tokens hold no next-token pair: they are
counted under `short_document` and left out (or raise, with data.on_bad_input=fail).

Any inconsistency between the two files (magic, version, dtype code, sizes, pointers, document
indices, a .bin of the wrong length) is a DataError naming the file, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import numpy as np

from plamo_jax.data.documents import DocumentPart, TokenDocuments
from plamo_jax.data.sources import ReadReport
from plamo_jax.errors import DataError

SOURCE_PREFIX = "megatron:"
MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index entries
# megatron.core.datasets.indexed_dataset.DType; only integer codes can hold token ids.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
FLOAT_CODES = {6: "float64", 7: "float32"}
# Token ids checked against the tokenizer's vocabulary: this many evenly spread windows of this many
# tokens (a full scan of a terabyte corpus would take minutes at every start).
_CHECKED_WINDOWS, _CHECKED_WINDOW_TOKENS = 64, 1 << 14


@dataclasses.dataclass(frozen=True)
class MegatronIndex:
    """The `.idx` arrays, memory-mapped read-only."""

    path: Path
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32[N]
    sequence_pointers: np.ndarray  # int64[N], bytes
    document_indices: np.ndarray  # int64[D]

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)


def read_index(idx_path: str | Path) -> MegatronIndex:
    """Parse and check a `.idx` file (header, sizes, document indices)."""
    path = Path(idx_path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist; expected the .idx file of a Megatron indexed dataset")
    size = path.stat().st_size
    if size < HEADER.size:
        raise DataError(f"{str(path)!r} holds {size} bytes; expected at least the {HEADER.size}-byte "
                        "MMIDIDX header of a Megatron .idx file")
    with open(path, "rb") as f:
        magic, version, code, sequences, entries = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise DataError(f"{str(path)!r} starts with {magic!r}; expected the magic {MAGIC!r} of a Megatron "
                        "indexed dataset (MMIDIDX)")
    if version != VERSION:
        raise DataError(f"{str(path)!r} has MMIDIDX version {version}; expected {VERSION}")
    if code in FLOAT_CODES:
        raise DataError(f"{str(path)!r} has dtype code {code} ({FLOAT_CODES[code]}); expected integer token "
                        f"ids, one of the codes {sorted(DTYPE_CODES)}")
    if code not in DTYPE_CODES:
        raise DataError(f"{str(path)!r} has dtype code {code}; expected one of {sorted(DTYPE_CODES)} "
                        "(megatron.core.datasets.indexed_dataset.DType)")
    expected = HEADER.size + sequences * (4 + 8) + entries * 8
    if size == expected + sequences:
        raise DataError(f"{str(path)!r} holds sequence modes (a multimodal Megatron dataset); expected "
                        "a text corpus")
    if size != expected:
        raise DataError(f"{str(path)!r} holds {size} bytes; its header ({sequences} sequences, {entries} "
                        f"document-index entries) needs {expected}: the file is truncated or corrupted")
    whole = np.memmap(path, dtype=np.uint8, mode="r")
    lengths = whole[HEADER.size : HEADER.size + 4 * sequences].view("<i4")
    pointers_at = HEADER.size + 4 * sequences
    pointers = whole[pointers_at : pointers_at + 8 * sequences].view("<i8")
    document_indices = whole[pointers_at + 8 * sequences : expected].view("<i8")
    _check_document_indices(path, document_indices, sequences)
    if sequences and int(lengths.min()) < 0:
        at = int(np.argmin(lengths))
        raise DataError(f"{str(path)!r}: sequence {at} has length {int(lengths[at])}; expected >= 0")
    return MegatronIndex(path, np.dtype(DTYPE_CODES[code]).newbyteorder("<"), lengths, pointers,
                         document_indices)


def _check_document_indices(path: Path, document_indices: np.ndarray, sequences: int) -> None:
    if len(document_indices) == 0 or int(document_indices[0]) != 0:
        first = int(document_indices[0]) if len(document_indices) else None
        raise DataError(f"{str(path)!r}: document indices start with {first}; expected 0")
    if int(document_indices[-1]) != sequences:
        raise DataError(f"{str(path)!r}: the last document index is {int(document_indices[-1])}; expected "
                        f"the sequence count {sequences}")
    steps = np.diff(document_indices)
    if len(steps) and int(steps.min()) < 0:
        at = int(np.argmin(steps))
        raise DataError(f"{str(path)!r}: document index {at + 1} is {int(document_indices[at + 1])}, below "
                        f"the one before it ({int(document_indices[at])}); expected non-decreasing indices")


def _document_token_spans(index: MegatronIndex, bin_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of every document in tokens of `.bin`, after checking the pointers and the .bin size."""
    itemsize = index.dtype.itemsize
    lengths = index.sequence_lengths.astype(np.int64)
    # megatron-core writes sequences back to back: pointer i is the byte sum of the lengths before it.
    expected_pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * itemsize]) if len(lengths) else lengths
    wrong = np.flatnonzero(index.sequence_pointers != expected_pointers)
    if len(wrong):
        at = int(wrong[0])
        raise DataError(f"{str(index.path)!r}: sequence {at} points to byte "
                        f"{int(index.sequence_pointers[at])}; expected {int(expected_pointers[at])} (the "
                        "sequences before it, back to back)")
    total_tokens = int(lengths.sum())
    bin_size = bin_path.stat().st_size
    if bin_size != total_tokens * itemsize:
        state = "truncated" if bin_size < total_tokens * itemsize else "longer than its index says"
        raise DataError(f"{str(bin_path)!r} holds {bin_size} bytes; {index.path.name} lists {total_tokens} "
                        f"{index.dtype.name} tokens = {total_tokens * itemsize} bytes: the .bin is {state}")
    token_starts = np.concatenate([[0], np.cumsum(lengths)])  # sequence i starts at token_starts[i]
    return token_starts[index.document_indices[:-1]], token_starts[index.document_indices[1:]]


def open_megatron_corpus(prefix: str | Path, *, report: ReadReport | None = None,
                         on_bad_input: str = "skip") -> TokenDocuments:
    """The documents of `PREFIX.bin` / `PREFIX.idx`, memory-mapped; short documents counted and left out."""
    report = report if report is not None else ReadReport()
    prefix = str(prefix)
    bin_path = Path(prefix + ".bin")
    index = read_index(prefix + ".idx")
    if not bin_path.is_file():
        raise DataError(f"{str(bin_path)!r} does not exist; expected the tokens next to {str(index.path)!r}")
    starts, ends = _document_token_spans(index, bin_path)
    short = np.flatnonzero(ends - starts < 2)
    for document in short[:1] if on_bad_input == "fail" else short[:20]:
        report.bad("short_document", f"{prefix} document {int(document)}",
                   f"{int(ends[document] - starts[document])} tokens; expected >= 2", on_bad_input)
    if len(short) > 20:  # counted, not listed one by one
        report.skipped["short_document"] += len(short) - 20
    keep = ends - starts >= 2
    report.documents += int(keep.sum())
    part = DocumentPart.spans(starts[keep], ends[keep], tokens_path=bin_path, raw_dtype=index.dtype)
    documents = TokenDocuments([part])
    if documents.num_documents == 0:
        raise DataError(f"Megatron dataset {prefix!r} holds no document of two or more tokens "
                        f"({index.num_sequences} sequences, {len(index.document_indices) - 1} documents)")
    return documents


def check_token_ids(documents: TokenDocuments, vocab_size: int, where: str) -> None:
    """DataError when a sampled token id (for a small corpus: any) is outside the tokenizer's vocabulary."""
    for part in documents.parts:
        tokens = part.tokens
        if len(tokens) <= _CHECKED_WINDOWS * _CHECKED_WINDOW_TOKENS:
            samples = [tokens]
        else:
            step = (len(tokens) - _CHECKED_WINDOW_TOKENS) / (_CHECKED_WINDOWS - 1)
            samples = [tokens[(begin := math.floor(i * step)) : begin + _CHECKED_WINDOW_TOKENS]
                       for i in range(_CHECKED_WINDOWS)]
        for sample in samples:
            if len(sample) and (int(sample.max()) >= vocab_size or int(sample.min()) < 0):
                bad = int(sample.max()) if int(sample.max()) >= vocab_size else int(sample.min())
                raise DataError(f"{where} holds token id {bad}; expected ids in [0, {vocab_size}) of "
                                "data.tokenizer (the corpus was tokenized with another vocabulary?)")


def parse_blend(entry: str) -> list[tuple[str, float]] | None:
    """Megatron's `--data-path` blend `"W1 PREFIX1 W2 PREFIX2 ..."` -> [(`megatron:PREFIX`, W)], else None.

    An entry is a blend when it has whitespace and its words alternate number, path: a plain path
    with a space in it is not mistaken for one.
    """
    words = entry.split()
    if len(words) < 2 or len(words) % 2:
        return None
    blend = []
    for weight_text, prefix in zip(words[::2], words[1::2], strict=True):
        try:
            weight = float(weight_text)
        except ValueError:
            return None
        if not (weight > 0 and math.isfinite(weight)):
            raise DataError(f"data.source blend {entry!r} has weight {weight_text} for {prefix!r}; "
                            "expected a finite number > 0")
        blend.append((SOURCE_PREFIX + prefix, weight))
    return blend
