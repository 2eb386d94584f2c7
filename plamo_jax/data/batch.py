"""The batch layout, defined once: the fields of a training row and their dtypes.

A language-modelling batch holds these fields as [batch, seq_len] arrays. An objective that scores
several sequences per example (DPO: a chosen and a rejected answer) names each field with a prefix,
`chosen_input_ids`, ..., one prefix per sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

FIELDS = ("input_ids", "target_ids", "segment_ids", "positions", "loss_mask")
DTYPES = {
    "input_ids": np.dtype(np.int32),
    "target_ids": np.dtype(np.int32),
    "segment_ids": np.dtype(np.int32),  # 0 = padding, 1, 2, ... = the documents of a packed row
    "positions": np.dtype(np.int32),  # position within the document (RoPE)
    "loss_mask": np.dtype(np.float32),  # 1 where predicting target_ids counts
}


def keys(prefixes: Sequence[str] = ("",)) -> tuple[str, ...]:
    """Every batch key for sequences named by `prefixes` ("" = the plain fields)."""
    return tuple(prefixed(prefix, field) for prefix in prefixes for field in FIELDS)


def prefixed(prefix: str, field: str) -> str:
    return f"{prefix}_{field}" if prefix else field


def dtype_of(key: str) -> np.dtype:
    return DTYPES[_field(key)]


def _field(key: str) -> str:
    for field in FIELDS:
        if key == field or key.endswith("_" + field):
            return field
    raise KeyError(f"{key!r} is not a batch key; expected one of {FIELDS}, possibly prefixed")


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row of padding: pad tokens, segment 0, nothing learned."""
    row = {field: np.zeros(seq_len, DTYPES[field]) for field in FIELDS}
    row["input_ids"][:] = pad_id
    row["target_ids"][:] = pad_id
    return row


def sequence(batch: Mapping[str, np.ndarray], prefix: str) -> dict:
    """The plain fields of the sequence named `prefix` in a multi-sequence batch."""
    return {field: batch[prefixed(prefix, field)] for field in FIELDS}
