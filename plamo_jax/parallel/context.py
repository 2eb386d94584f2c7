"""Context parallelism's layout: how a sequence sharded along the `sequence` mesh axis is laid out.

With `model.context_parallel` ("all_gather" or "ring": models/context_attention.py) attention stays
sharded along the `sequence` axis. Under causal masking a contiguous split gives the last shard the most
work (its queries see every earlier key). With `model.context_load_balance` the training step lays the
batch out once, before the model (`lay_out_batch`): the sequence is cut into 2S chunks and shard r holds
chunks r and 2S-1-r, so every shard does the same attention work. Tokens, targets, positions, segment
ids and loss masks move together, so the loss, a sum over tokens, is unchanged; attention (every
strategy, and the masks of the single-program paths) and the SSM's state passing read the layout from
`balanced_layout`. This module also counts the work per shard and the ring steps a window needs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from plamo_jax.errors import ShardingError
from plamo_jax.parallel import rules as sharding_rules

SEQUENCE_AXIS = "sequence"
STRATEGIES = ("none", "all_gather", "ring")

_BALANCED: contextvars.ContextVar[bool] = contextvars.ContextVar("plamo_jax_balanced_layout", default=False)


@contextlib.contextmanager
def balanced_layout(enabled: bool = True) -> Iterator[None]:
    """Trace the enclosed model calls for a batch laid out by `lay_out_batch`."""
    token = _BALANCED.set(enabled)
    try:
        yield
    finally:
        _BALANCED.reset(token)


def sequence_shards() -> int:
    """Devices along the `sequence` axis of the active mesh (1 without one)."""
    mesh = sharding_rules.active_mesh()
    return 1 if mesh is None else mesh.shape.get(SEQUENCE_AXIS, 1)


def chunks_per_shard() -> int:
    """Contiguous chunks of the original sequence each shard holds: 2 under the balanced layout."""
    return 2 if _BALANCED.get() and sequence_shards() > 1 else 1


def chunk_order(shards: int, chunks: int) -> np.ndarray:
    """[shards, chunks]: the original chunk index of each shard's local chunks, in local order."""
    if chunks == 1:
        return np.arange(shards)[:, None]
    return np.stack([np.arange(shards), 2 * shards - 1 - np.arange(shards)], axis=1)


def token_order(length: int, shards: int, chunks: int) -> np.ndarray:
    """int32 [length]: the original token index at each position of the laid-out sequence."""
    if length % (shards * chunks):
        raise ShardingError(f"train.seq_len={length}: expected a multiple of {shards * chunks} "
                            f"(mesh.sequence={shards} x {chunks} chunks per shard)")
    size = length // (shards * chunks)
    starts = chunk_order(shards, chunks).reshape(-1) * size
    return (starts[:, None] + np.arange(size)[None, :]).reshape(-1).astype(np.int32)


def layout_tokens(length: int) -> np.ndarray | None:
    """Token indices of a length-`length` row under the current layout, or None when in order."""
    chunks = chunks_per_shard()
    return None if chunks == 1 else token_order(length, sequence_shards(), chunks)


def load_balanced(model_cfg, shards: int) -> bool:
    """Whether a training step on `shards` sequence shards lays its batch out for causal balance."""
    return shards > 1 and model_cfg.context_parallel != "none" and bool(model_cfg.context_load_balance)


def lay_out_batch(batch: dict, shards: int) -> dict:
    """Every [B, L] field reordered into the balanced layout (see the module docstring)."""
    return {key: jnp.take(value, token_order(value.shape[1], shards, 2), axis=1)
            for key, value in batch.items()}


# ------------------------------------------------------------------------------------- work accounting


def _chunk_is_live(q_start: int, k_start: int, size: int, window: int) -> bool:
    """Whether some query of a chunk of `size` tokens at q_start may see some key of the one at k_start."""
    causal = k_start <= q_start + size - 1
    return causal and (window <= 0 or q_start - (k_start + size - 1) < window)


def live_blocks_per_shard(length: int, shards: int, *, balanced: bool, block: int,
                          window: int = 0) -> np.ndarray:
    """[shards]: the (query block, key block) pairs each shard computes under causal (+ window) masking,
    the pairs the flash kernel does not skip (the attention work per device)."""
    chunks = 2 if balanced else 1
    order = token_order(length, shards, chunks).reshape(shards, -1)
    counts = np.zeros(shards, np.int64)
    for shard in range(shards):
        query_starts = order[shard][::block]
        for q_start in query_starts:
            counts[shard] += sum(_chunk_is_live(int(q_start), k_start, block, window)
                                 for k_start in range(0, length, block))
    return counts


def ring_shifts(shards: int, chunks: int, chunk: int, window) -> tuple[int, ...]:
    """The ring steps (shift s: a shard holds the blocks of shard me - s) in which some shard has a live
    (query chunk, key chunk) pair; every step when the window is only known at run time."""
    if not isinstance(window, int):
        return tuple(range(shards))
    order = chunk_order(shards, chunks) * chunk
    live = set()
    for shift in range(shards):
        for shard in range(shards):
            source = (shard - shift) % shards
            pairs = [(int(q), int(k)) for q in order[shard] for k in order[source]]
            if any(_chunk_is_live(q, k, chunk, window) for q, k in pairs):
                live.add(shift)
    return tuple(sorted(live))
