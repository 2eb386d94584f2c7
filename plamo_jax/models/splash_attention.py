"""Pallas TPU splash attention for one device's shard, in the dense path's layout and masking.

`model.attention_impl=splash` (and `auto` on TPU). It takes what `dot_product_attention` takes,
[B, L, H, D] queries and [B, L, K, D] keys / values with H a multiple of K (query head h reads KV head
h // (H / K)), and masks the same way: causal, same segment id, and within `window` tokens when
window > 0. The window must be a Python int here (splash builds its block mask ahead of tracing),
where the dense path also takes a traced per-layer window. `sharded_splash_attention` runs it on each
device's shard of the batch and heads under the active mesh (`shard_map` with the rules' specs).

The kernel is JAX's `splash_attention` (forward and a hand-written backward) run as MQA per KV head:
each KV head serves its group of query heads, vmapped over KV heads and the batch. The softmax
scale 1/sqrt(D) is applied to the queries (splash scales nothing). interpret=True runs the same
kernel through Pallas's interpreter on any backend, which is how CPU tests check it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from plamo_jax.parallel import rules as sharding_rules

DEFAULT_BLOCK = 128  # a TPU lane width: splash's tiles are multiples of it


def causal_window_mask(length: int, window: int, heads: int) -> masks.MultiHeadMask:
    """Causal, and with window > 0 only the last `window` keys up to the query (the dense mask)."""
    if window > 0:
        head = masks.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    else:
        head = masks.CausalMask((length, length))
    return masks.MultiHeadMask([head] * heads)


def block_sizes(length: int, block: int) -> splash.BlockSizes:
    size = min(block, length)
    return splash.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size,
                             block_kv_dkv=size, block_kv_dkv_compute=size, block_q_dq=size, block_kv_dq=size)


def splash_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, segment_ids_BL: jax.Array,
                     window: int = 0, *, block: int = DEFAULT_BLOCK, interpret: bool = False) -> jax.Array:
    """Softmax attention of one device's [B, L, H, D] queries: equals `dot_product_attention` with
    `attention_mask(segment_ids_BL, window)` (fp32 softmax statistics inside the kernel)."""
    batch, length, num_heads, head_dim = q_BLHD.shape
    num_kv_heads = k_BLKD.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"splash_attention: {num_heads} query heads do not split into {num_kv_heads} "
                         "KV groups")
    if length % min(block, length):
        raise ValueError(f"splash_attention: length {length} is not a multiple of the block {block}")
    group = num_heads // num_kv_heads
    kernel = splash.make_splash_mqa(causal_window_mask(length, int(window), group), head_shards=1,
                                    q_seq_shards=1, block_sizes=block_sizes(length, block),
                                    interpret=interpret)
    # [B, L, H, D] -> [B, K, G, L, D]: one MQA call per (row, KV head) serves its G query heads.
    q = (q_BLHD * jnp.asarray(head_dim**-0.5, q_BLHD.dtype)).reshape(batch, length, num_kv_heads, group,
                                                                     head_dim)
    q = q.transpose(0, 2, 3, 1, 4)
    k = k_BLKD.transpose(0, 2, 1, 3)  # [B, K, L, D]
    v = v_BLKD.transpose(0, 2, 1, 3)

    def one_kv_head(q_GLD, k_LD, v_LD, segments_L):
        return kernel(q_GLD, k_LD, v_LD, segment_ids=splash.SegmentIds(q=segments_L, kv=segments_L))

    per_head = jax.vmap(one_kv_head, in_axes=(0, 0, 0, None))  # over KV heads
    out = jax.vmap(per_head)(q, k, v, segment_ids_BL.astype(jnp.int32))  # over rows: [B, K, G, L, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim).astype(q_BLHD.dtype)


def sharded_splash_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array,
                             segment_ids_BL: jax.Array, window: int = 0, *, block: int = DEFAULT_BLOCK,
                             interpret: bool = False) -> jax.Array:
    """`splash_attention` on each device's rows and heads under the active mesh (directly without one).

    Rows follow act_batch and heads act_heads / act_kv_heads, as the dense path's constraints lay them
    out; the whole sequence is local. Query and KV heads must split over the same mesh axes (each
    device then holds whole query groups of its KV heads); where the rules shard only one of them,
    both are gathered.
    """
    kernel = functools.partial(splash_attention, window=window, block=block, interpret=interpret)
    current = sharding_rules.active_mesh_and_rules()
    if current is None:
        return kernel(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
    mesh, rules = current
    spec = lambda axes, shape: sharding_rules.logical_to_spec(axes, rules, mesh, shape, "splash attention",
                                                               drop_indivisible=True)
    q_spec = spec(("act_batch", None, "act_heads", None), q_BLHD.shape)
    kv_spec = spec(("act_batch", None, "act_kv_heads", None), k_BLKD.shape)
    if q_spec[2] != kv_spec[2]:
        q_spec = PartitionSpec(q_spec[0], None, None, None)
        kv_spec = PartitionSpec(kv_spec[0], None, None, None)
    rows_spec = PartitionSpec(q_spec[0], None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, rows_spec), out_specs=q_spec,
                         check_vma=False)(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
