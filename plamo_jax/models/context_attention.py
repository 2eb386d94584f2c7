"""Context-parallel attention: queries, keys and values sharded along the `sequence` mesh axis.

The `sequence` axis shards every activation's length. Without context parallelism attention gathers the
whole sequence on every device (heads stay sharded); with it each device keeps its own queries and
meets the other shards' keys and values in one of two ways, or trades heads for sequence
(`model.context_parallel`):

- "all_gather": keys and values are gathered along the axis (one collective, overlappable with the
  projections), queries stay local. Memory for keys and values grows with the sequence.
- "ring": key/value blocks rotate around the axis with `ppermute`; at each step a shard attends its
  queries to the block it holds (the flash kernel's online softmax, merged across steps by
  log-sum-exp), while the next block is already in flight: nothing is ever gathered. The backward pass
  is a second ring that carries each block's key/value gradients with it and sends them home at the
  end. With a sliding window known at trace time only the ring steps some query can see are run, so a
  windowed layer exchanges blocks with its neighbours only.
- "ulysses": an all-to-all trades heads for sequence ([B, L/S, H, D] -> [B, L, H/S, D]), each shard
  attends the whole sequence for its 1/S of the query and key/value heads, and a second all-to-all
  brings the output back. Needs the heads (and key/value heads) of a device divisible by the axis.

The layout (contiguous, or causal load-balanced: chunks r and 2S-1-r on shard r) is
parallel/context.py's; each shard's token indices come from it (ulysses: the whole laid-out sequence's,
with the segment ids gathered), so masks are exact under either.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from plamo_jax.errors import ShardingError
from plamo_jax.models.flash_attention import backward_blocks, blockwise_attention, forward_blocks
from plamo_jax.parallel import rules as sharding_rules
from plamo_jax.parallel.context import SEQUENCE_AXIS, STRATEGIES, chunks_per_shard, ring_shifts, token_order

_NEG_INF = float("-inf")




def _rotate(tree, shift: int, shards: int):
    """Every leaf of shard i goes to shard i + shift (mod shards)."""
    if shift % shards == 0:
        return tree
    perm = [(i, (i + shift) % shards) for i in range(shards)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, SEQUENCE_AXIS, perm), tree)


def _shard_tokens(shard, local_length: int, order: np.ndarray) -> jax.Array:
    """Token indices of the local positions of `shard` (traced) under the laid-out `order`."""
    return jax.lax.dynamic_slice_in_dim(jnp.asarray(order), shard * local_length, local_length)


def _merge(acc, part):
    """Two partial softmax results (out, lse, row max) over disjoint keys as one."""
    out_a, lse_a, max_a = acc
    out_b, lse_b, max_b = part
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weight_a = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)
    weight_b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)
    out = out_a * weight_a[..., None] + out_b * weight_b[..., None]
    return out, lse, jnp.maximum(max_a, max_b)


def _walk_ring(shifts: tuple[int, ...], shards: int, blocks, carried, state, visit):
    """(carried, state) after `carried, state = visit(blocks, carried, shift, state)` for every ring step.

    `blocks` (keys, values, segment ids) and `carried` (what travels with them and is updated on the way:
    gradient accumulators) rotate around the ring between steps. A contiguous walk (shifts 0, 1, ..., n-1)
    is a `lax.scan` whose body sends the blocks on while it computes with them, so one block is in flight
    and one in use at a time (an unrolled loop lets the scheduler start every transfer at once and hold all
    blocks: an all-gather in disguise). Sparse shifts (a window known at trace time) are few: unrolled.
    `carried` ends on the shard holding the last shift's blocks.
    """
    if shifts == tuple(range(len(shifts))) and len(shifts) > 1:
        def body(loop, shift):
            blocks, carried, state = loop
            following = _rotate(blocks, 1, shards)  # in flight while this step computes
            carried, state = visit(blocks, carried, shift, state)
            return (following, _rotate(carried, 1, shards), state), None

        steps = jnp.arange(len(shifts) - 1)
        (blocks, carried, state), _ = jax.lax.scan(body, (blocks, carried, state), steps)
        return visit(blocks, carried, len(shifts) - 1, state)
    current = 0
    for shift in shifts:
        blocks, carried = _rotate((blocks, carried), shift - current, shards)
        current = shift
        carried, state = visit(blocks, carried, shift, state)
    return carried, state


def _ring_forward(q, k, v, q_segments, k_segments, window, *, shards, order, shifts, block):
    me = jax.lax.axis_index(SEQUENCE_AXIS)
    local = q.shape[3]
    q_tokens = _shard_tokens(me, local, order)

    def visit(blocks, carried, shift, acc):
        k_tokens = _shard_tokens((me - shift) % shards, local, order)
        keys, values, key_segments = blocks
        part = forward_blocks(q, keys, values, q_segments, key_segments, q_tokens, k_tokens, window, block)
        return carried, _merge(acc, part)

    acc = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], _NEG_INF, jnp.float32),
           jnp.full(q.shape[:-1], _NEG_INF, jnp.float32))
    _, acc = _walk_ring(shifts, shards, (k, v, k_segments), (), acc, visit)
    return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _ring_attention(q, k, v, q_segments, k_segments, window, shards, order, shifts, block):
    out, _, row_max = _ring_forward(q, k, v, q_segments, k_segments, window, shards=shards, order=order,
                                    shifts=shifts, block=block)
    return out.astype(q.dtype), row_max


def _ring_attention_fwd(q, k, v, q_segments, k_segments, window, shards, order, shifts, block):
    out, lse, row_max = _ring_forward(q, k, v, q_segments, k_segments, window, shards=shards, order=order,
                                      shifts=shifts, block=block)
    out = out.astype(q.dtype)
    return (out, row_max), (q, k, v, q_segments, k_segments, window, out, lse)


def _ring_attention_bwd(shards, order, shifts, block, residuals, cotangents):
    """A second ring: each key/value block travels with its gradient accumulators, to which every shard
    adds its queries' contribution; after the walk the accumulators go home."""
    d_out, _ = cotangents  # the row maximum is a statistic
    q, k, v, q_segments, k_segments, window, out, lse = residuals
    me = jax.lax.axis_index(SEQUENCE_AXIS)
    local = q.shape[3]
    q_tokens = _shard_tokens(me, local, order)

    def visit(blocks, grads, shift, d_q):
        k_tokens = _shard_tokens((me - shift) % shards, local, order)
        dq_part, dk_part, dv_part = backward_blocks(q, blocks[0], blocks[1], q_segments, blocks[2], q_tokens,
                                                    k_tokens, window, block, out, lse, d_out)
        return (grads[0] + dk_part, grads[1] + dv_part), d_q + dq_part

    grads = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    grads, d_q = _walk_ring(shifts, shards, (k, v, k_segments), grads, jnp.zeros(q.shape, jnp.float32), visit)
    d_k, d_v = _rotate(grads, -shifts[-1], shards)  # each block's gradients go home
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _kernel_layout(q_BLHD, k_BLKD, v_BLKD):
    """q [B, K, G, L, D] (query heads grouped by their key/value head), k and v [B, K, L, D]."""
    batch, length, heads, head_dim = q_BLHD.shape
    kv_heads = k_BLKD.shape[2]
    q = q_BLHD.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    return q, k_BLKD.transpose(0, 2, 1, 3), v_BLKD.transpose(0, 2, 1, 3)


def _from_kernel_layout(out_BKGLD):
    """The kernel's output [B, K, G, L, D] as [B, L, H, D]."""
    batch, kv_heads, group, length, head_dim = out_BKGLD.shape
    return out_BKGLD.transpose(0, 3, 1, 2, 4).reshape(batch, length, kv_heads * group, head_dim)


def _ulysses(q_BLHD, k_BLKD, v_BLKD, segments, window, order, block):
    """Heads <-> sequence. Splitting the query and the key/value heads into S equal runs keeps every
    query head with its key/value head (H/S is a multiple of the group H/K when S divides K)."""
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=SEQUENCE_AXIS, split_axis=2, concat_axis=1,
                                 tiled=True)  # [B, L/S, H, D] -> [B, L, H/S, D], the sequence laid out
    q, k, v = _kernel_layout(to_heads(q_BLHD), to_heads(k_BLKD), to_heads(v_BLKD))
    all_segments = jax.lax.all_gather(segments, SEQUENCE_AXIS, axis=1, tiled=True)
    tokens = jnp.asarray(order)
    out, row_max = blockwise_attention(q, k, v, all_segments, all_segments, tokens, tokens, window, block)
    to_sequence = functools.partial(jax.lax.all_to_all, axis_name=SEQUENCE_AXIS, split_axis=1, concat_axis=2,
                                    tiled=True)
    return to_sequence(_from_kernel_layout(out)), row_max


def _largest(row_max, axis_names) -> jax.Array:
    """The largest attended score over every device (a statistic: no gradient)."""
    return jax.lax.pmax(jnp.max(jax.lax.stop_gradient(row_max)), axis_names)


def _local_attention(strategy: str, block: int, shards: int, chunks: int, static_window, axis_names):
    """The per-shard body over local q [B, Ls, H, D], k/v [B, Ls, K, D], segments [B, Ls], window []."""

    def body(q_BLHD, k_BLKD, v_BLKD, segments, window):
        local = q_BLHD.shape[1]
        chunk = local // chunks
        step = math.gcd(chunk, block)  # blocks never straddle two chunks
        order = token_order(local * shards, shards, chunks)
        window = window.astype(jnp.int32)
        if strategy == "ulysses":
            out, row_max = _ulysses(q_BLHD, k_BLKD, v_BLKD, segments, window, order, step)
            return out, _largest(row_max, axis_names)
        q, k, v = _kernel_layout(q_BLHD, k_BLKD, v_BLKD)
        if strategy == "ring":
            shifts = ring_shifts(shards, chunks, chunk, static_window)
            out, row_max = _ring_attention(q, k, v, segments, segments, window, shards, order, shifts, step)
        else:
            gather = functools.partial(jax.lax.all_gather, axis_name=SEQUENCE_AXIS, tiled=True)
            q_tokens = _shard_tokens(jax.lax.axis_index(SEQUENCE_AXIS), local, order)
            out, row_max = blockwise_attention(q, gather(k, axis=2), gather(v, axis=2), segments,
                                               gather(segments, axis=1), q_tokens, jnp.asarray(order), window,
                                               step)
        return _from_kernel_layout(out), _largest(row_max, axis_names)

    return body


def _check_ulysses_heads(mesh, q_spec, q_BLHD, k_BLKD) -> None:
    """Every device's query and key/value heads must split evenly over the sequence axis."""
    head_axes = q_spec[2] if isinstance(q_spec[2], tuple) else (q_spec[2],) if q_spec[2] else ()
    head_shards = mesh.shape[SEQUENCE_AXIS] * math.prod(mesh.shape[a] for a in head_axes)
    for key, count in (("num_heads", q_BLHD.shape[2]), ("num_kv_heads", k_BLKD.shape[2])):
        if count % head_shards:
            raise ShardingError(f"model.{key}={count}: context_parallel='ulysses' expected a multiple of the "
                                f"sequence x head shards = {head_shards}")


def context_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, segment_ids_BL: jax.Array,
                      window: int | jax.Array, *, strategy: str, block: int) -> tuple[jax.Array, jax.Array]:
    """(attention output, the largest attended score) with queries, keys and values sharded along the
    `sequence` axis of the active mesh: `dot_product_attention` under the current layout's token order.

    A window given as a Python int lets the ring skip the steps it rules out.
    """
    if strategy not in STRATEGIES[1:]:
        raise ShardingError(f"model.context_parallel={strategy!r}: expected one of {STRATEGIES[1:]}")
    mesh, rules = sharding_rules.active_mesh_and_rules()
    shards, chunks = mesh.shape[SEQUENCE_AXIS], chunks_per_shard()

    def spec(names, shape):
        return sharding_rules.logical_to_spec(names, rules, mesh, shape, drop_indivisible=True)

    q_spec = spec(("act_batch", "act_length", "act_heads", "act_head_dim"), q_BLHD.shape)
    k_spec = spec(("act_batch", "act_length", "act_kv_heads", "act_head_dim"), k_BLKD.shape)
    seg_spec = PartitionSpec(q_spec[0], q_spec[1])
    if q_spec[1] != SEQUENCE_AXIS:
        raise ShardingError(f"mesh.rules.act_length shards the length as {q_spec[1]!r}; context parallelism "
                            f"expected exactly {SEQUENCE_AXIS!r} (train.seq_len={q_BLHD.shape[1]})")
    if q_spec[2] != k_spec[2]:
        raise ShardingError(f"model.num_kv_heads={k_BLKD.shape[2]}: context parallelism expected the "
                            f"key/value heads sharded like the query heads "
                            f"({q_spec[2]!r}, not {k_spec[2]!r})")
    token_order(q_BLHD.shape[1], shards, chunks)  # a ShardingError when the length does not divide
    if strategy == "ulysses":
        _check_ulysses_heads(mesh, q_spec, q_BLHD, k_BLKD)
    static_window = window if isinstance(window, int) else None
    body = _local_attention(strategy, block, shards, chunks, static_window, tuple(mesh.axis_names))
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, seg_spec, PartitionSpec()),
                            out_specs=(q_spec, PartitionSpec()), check_vma=False)
    out, shard_max = sharded(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, jnp.asarray(window, jnp.int32))
    return out, shard_max
