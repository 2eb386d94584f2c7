"""Context parallelism's layout: how a sequence sharded along the `sequence` mesh axis is laid out.

With `model.context_parallel` ("all_gather", "ring" or "ulysses": models/context_attention.py)
attention stays sharded along the `sequence` axis. Under causal masking a contiguous split gives the last
shard the most work (its queries see every earlier key; ulysses, whose shards attend the whole sequence
for some of the heads, is balanced either way). With `model.context_load_balance` the training step lays the
batch out once, before the model (`lay_out_batch`): the sequence is cut into 2S chunks and shard r holds
chunks r and 2S-1-r, so every shard does the same attention work. Tokens, targets, positions, segment
ids and loss masks move together, so the loss, a sum over tokens, is unchanged; attention (every
strategy, and the masks of the single-program paths) and the SSM's state passing read the layout from
`balanced_layout`. This module also moves activations between the balanced and the contiguous layout
(`to_contiguous` / `to_balanced`: Megatron's undo/redo around Mamba layers, `model.ssm_context_layout`),
and counts the work per shard and the ring steps a window needs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from plamo_jax.errors import ShardingError
from plamo_jax.parallel import rules as sharding_rules

SEQUENCE_AXIS = "sequence"
STRATEGIES = ("none", "all_gather", "ring", "ulysses")
# How the hybrid's Mamba layers meet the balanced layout: scan each shard's two chunks where they are and
# pass states between them (in_place), or move the tokens to contiguous chunks and back (undo_redo).
SSM_LAYOUTS = ("in_place", "undo_redo")

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


# ------------------------------------------------------------------------- moving tokens between layouts
# Balanced shard r holds original chunks r and 2S-1-r, one even and one odd; contiguous shard q holds 2q and
# 2q+1. So every shard sends its even chunk to one shard and its odd chunk to another, and each of the two
# sends is a permutation of the shards: two ppermutes of half a shard each, no all-to-all.


def _chunks_by_parity(shards: int) -> np.ndarray:
    """[2, shards]: the original even (row 0) and odd (row 1) chunk each balanced shard holds."""
    order = chunk_order(shards, 2)
    return np.take_along_axis(order, np.argsort(order % 2, axis=1), axis=1).T


def _contiguous_pairs(shards: int) -> list[list[tuple[int, int]]]:
    """Per parity, the ppermute pairs (balanced shard, contiguous shard) that move those chunks."""
    return [[(r, int(chunk) // 2) for r, chunk in enumerate(row)] for row in _chunks_by_parity(shards)]


def _even_first(first_is_even: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a, b) when `first_is_even`, else (b, a): a shard's two balanced chunks as (even, odd) and back."""
    return jnp.where(first_is_even, a, b), jnp.where(first_is_even, b, a)


def _first_is_even(shards: int) -> jax.Array:
    """Whether this shard's first balanced chunk is an even one (traced, inside shard_map)."""
    return jnp.asarray(chunk_order(shards, 2)[:, 0] % 2 == 0)[jax.lax.axis_index(SEQUENCE_AXIS)]


def _to_contiguous_local(x: jax.Array, shards: int) -> jax.Array:
    """One shard's [B, 2c, ...] in the balanced layout -> its [B, 2c, ...] in the contiguous one."""
    first, second = jnp.split(x, 2, axis=1)
    even, odd = _even_first(_first_is_even(shards), first, second)
    pairs = _contiguous_pairs(shards)
    return jnp.concatenate([jax.lax.ppermute(even, SEQUENCE_AXIS, pairs[0]),
                            jax.lax.ppermute(odd, SEQUENCE_AXIS, pairs[1])], axis=1)


def _to_balanced_local(x: jax.Array, shards: int) -> jax.Array:
    """One shard's [B, 2c, ...] in the contiguous layout -> its [B, 2c, ...] in the balanced one."""
    even, odd = jnp.split(x, 2, axis=1)
    back = [[(q, r) for r, q in pairs] for pairs in _contiguous_pairs(shards)]
    even, odd = jax.lax.ppermute(even, SEQUENCE_AXIS, back[0]), jax.lax.ppermute(odd, SEQUENCE_AXIS, back[1])
    return jnp.concatenate(_even_first(_first_is_even(shards), even, odd), axis=1)


def _relayout(local_fn, x: jax.Array, logical_axes) -> jax.Array:
    """`local_fn(local x, shards)` on every shard of x, whose dimension 1 is the sharded sequence."""
    mesh, rules = sharding_rules.active_mesh_and_rules()
    spec = sharding_rules.logical_to_spec(logical_axes, rules, mesh, x.shape, drop_indivisible=True)
    if spec[1] != SEQUENCE_AXIS:
        raise ShardingError(f"mesh.rules.act_length shards the length as {spec[1]!r}; moving tokens between "
                            f"context layouts expected exactly {SEQUENCE_AXIS!r}")
    shards = mesh.shape[SEQUENCE_AXIS]
    # check_vma=False: the pipeline's vmaps add their axes to the specs (models/pipelined_stack.py)
    return jax.shard_map(lambda local: local_fn(local, shards), mesh=mesh, in_specs=spec, out_specs=spec,
                         check_vma=False)(x)


def to_contiguous(x: jax.Array, logical_axes) -> jax.Array:
    """x [B, L, ...] in the balanced layout, moved so that shard q holds original chunks 2q and 2q+1."""
    return _relayout(_to_contiguous_local, x, logical_axes)


def to_balanced(x: jax.Array, logical_axes) -> jax.Array:
    """The inverse of `to_contiguous`: shard r holds original chunks r and 2S-1-r again."""
    return _relayout(_to_balanced_local, x, logical_axes)


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
