"""Blockwise (flash-style) attention in plain JAX: memory linear in the sequence, exact softmax.

Queries and keys are cut into blocks; each query block walks the key blocks with an online
softmax (running max, normaliser, weighted sum). The backward pass is written out (FlashAttention-2
style) and recomputes each block's probabilities from the saved log-normaliser, so neither pass
holds an [L, L] score matrix. Blocks that the causal mask (or the window) rules out entirely are
skipped. Masking is the dense path's: causal by index, same segment id, and within `window` tokens
when window > 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG_INF = float("-inf")


def _pad_to_blocks(x: jax.Array, axis: int, block: int, value) -> jax.Array:
    extra = -x.shape[axis] % block
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _block_mask(q_start, k_start, block: int, q_segments, k_segments, window) -> jax.Array:
    """[B, block, block] allowed(query, key) for the blocks starting at q_start and k_start."""
    query = q_start + jnp.arange(block)[:, None]
    key = k_start + jnp.arange(block)[None, :]
    allowed = (key <= query) & ((window <= 0) | (query - key < window))
    return allowed[None] & (q_segments[:, :, None] == k_segments[:, None, :])


def _block_is_live(q_start, k_start, block: int, window) -> jax.Array:
    """Whether any (query, key) pair of the two blocks can pass the causal and window masks."""
    causal = k_start <= q_start + block - 1
    in_window = (window <= 0) | (q_start - (k_start + block - 1) < window)
    return causal & in_window


def _forward(q, k, v, q_segments, k_segments, window, block):
    """q [B, K, G, L, D] (L a multiple of block), k/v [B, K, L, D] -> (out like q, lse [B, K, G, L],
    the largest attended score of each query [B, K, G, L])."""
    batch, kv_heads, group, length, head_dim = q.shape
    scale = head_dim**-0.5
    num_blocks = length // block

    def one_query_block(q_index):
        q_start = q_index * block
        q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, block, axis=3)
        q_seg = jax.lax.dynamic_slice_in_dim(q_segments, q_start, block, axis=1)

        def visit(carry, k_index):
            k_start = k_index * block

            def update(carry):
                running_max, normaliser, total = carry
                k_blk = jax.lax.dynamic_slice_in_dim(k, k_start, block, axis=2)
                v_blk = jax.lax.dynamic_slice_in_dim(v, k_start, block, axis=2)
                k_seg = jax.lax.dynamic_slice_in_dim(k_segments, k_start, block, axis=1)
                scores = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
                mask = _block_mask(q_start, k_start, block, q_seg, k_seg, window)[:, None, None]
                scores = jnp.where(mask, scores * scale, _NEG_INF)
                new_max = jnp.maximum(running_max, scores.max(axis=-1))
                safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
                probs = jnp.exp(scores - safe_max[..., None])
                rescale = jnp.exp(jnp.where(jnp.isfinite(running_max), running_max - safe_max, _NEG_INF))
                normaliser = normaliser * rescale + probs.sum(axis=-1)
                weighted = jnp.einsum("bkgqs,bksd->bkgqd", probs.astype(v.dtype), v_blk,
                                      preferred_element_type=jnp.float32)
                return new_max, normaliser, total * rescale[..., None] + weighted

            live = _block_is_live(q_start, k_start, block, window)
            return jax.lax.cond(live, update, lambda carry: carry, carry), None

        init = (
            jnp.full((batch, kv_heads, group, block), _NEG_INF, jnp.float32),
            jnp.zeros((batch, kv_heads, group, block), jnp.float32),
            jnp.zeros((batch, kv_heads, group, block, head_dim), jnp.float32),
        )
        (running_max, normaliser, total), _ = jax.lax.scan(visit, init, jnp.arange(num_blocks))
        empty = normaliser == 0  # padding queries see no key
        out = jnp.where(empty[..., None], 0.0, total / jnp.where(empty, 1.0, normaliser)[..., None])
        lse = jnp.where(empty, _NEG_INF, running_max + jnp.log(jnp.where(empty, 1.0, normaliser)))
        return out, lse, running_max

    outs, lses, maxima = jax.lax.map(one_query_block, jnp.arange(num_blocks))  # [n, B, K, G, block, ...]
    out = jnp.moveaxis(outs, 0, 3).reshape(batch, kv_heads, group, length, head_dim)
    lse = jnp.moveaxis(lses, 0, 3).reshape(batch, kv_heads, group, length)
    row_max = jnp.moveaxis(maxima, 0, 3).reshape(batch, kv_heads, group, length)
    return out.astype(q.dtype), lse, row_max


def _backward(q, k, v, q_segments, k_segments, window, block, out, lse, d_out):
    batch, kv_heads, group, length, head_dim = q.shape
    scale = head_dim**-0.5
    num_blocks = length // block
    delta = jnp.einsum("bkgqd,bkgqd->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def one_key_block(d_q, k_index):
        k_start = k_index * block
        k_blk = jax.lax.dynamic_slice_in_dim(k, k_start, block, axis=2)
        v_blk = jax.lax.dynamic_slice_in_dim(v, k_start, block, axis=2)
        k_seg = jax.lax.dynamic_slice_in_dim(k_segments, k_start, block, axis=1)

        def visit(carry, q_index):
            q_start = q_index * block

            def update(carry):
                d_q, d_k, d_v = carry
                q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, block, axis=3)
                q_seg = jax.lax.dynamic_slice_in_dim(q_segments, q_start, block, axis=1)
                do_blk = jax.lax.dynamic_slice_in_dim(d_out, q_start, block, axis=3)
                lse_blk = jax.lax.dynamic_slice_in_dim(lse, q_start, block, axis=3)
                delta_blk = jax.lax.dynamic_slice_in_dim(delta, q_start, block, axis=3)
                scores = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
                mask = _block_mask(q_start, k_start, block, q_seg, k_seg, window)[:, None, None]
                safe_lse = jnp.where(jnp.isfinite(lse_blk), lse_blk, 0.0)
                probs = jnp.where(mask, jnp.exp(scores * scale - safe_lse[..., None]), 0.0)
                d_v = d_v + jnp.einsum("bkgqs,bkgqd->bksd", probs, do_blk.astype(jnp.float32))
                d_probs = jnp.einsum("bkgqd,bksd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
                d_scores = probs * (d_probs - delta_blk[..., None]) * scale
                d_k = d_k + jnp.einsum("bkgqs,bkgqd->bksd", d_scores, q_blk.astype(jnp.float32))
                d_q_blk = jnp.einsum("bkgqs,bksd->bkgqd", d_scores, k_blk.astype(jnp.float32))
                current = jax.lax.dynamic_slice_in_dim(d_q, q_start, block, axis=3)
                d_q = jax.lax.dynamic_update_slice_in_dim(d_q, current + d_q_blk, q_start, axis=3)
                return d_q, d_k, d_v

            live = _block_is_live(q_start, k_start, block, window)
            return jax.lax.cond(live, update, lambda carry: carry, carry), None

        zeros = jnp.zeros((batch, kv_heads, block, head_dim), jnp.float32)
        (d_q, d_k, d_v), _ = jax.lax.scan(visit, (d_q, zeros, zeros), jnp.arange(num_blocks))
        return d_q, (d_k, d_v)

    d_q, (d_ks, d_vs) = jax.lax.scan(one_key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(num_blocks))
    d_k = jnp.moveaxis(d_ks, 0, 2).reshape(k.shape)
    d_v = jnp.moveaxis(d_vs, 0, 2).reshape(v.shape)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, q_segments, k_segments, window, block):
    """(out, largest attended score per query); the second is a statistic: no gradient flows into it."""
    out, _, row_max = _forward(q, k, v, q_segments, k_segments, window, block)
    return out, row_max


def _attention_fwd(q, k, v, q_segments, k_segments, window, block):
    out, lse, row_max = _forward(q, k, v, q_segments, k_segments, window, block)
    return (out, row_max), (q, k, v, q_segments, k_segments, window, out, lse)


def _attention_bwd(block, residuals, cotangents):
    d_out, _ = cotangents  # the score maximum is only observed (its cotangent is zero)
    q, k, v, q_segments, k_segments, window, out, lse = residuals
    d_q, d_k, d_v = _backward(q, k, v, q_segments, k_segments, window, block, out, lse, d_out)
    return d_q, d_k, d_v, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(
    q_BLHD: jax.Array,
    k_BLKD: jax.Array,
    v_BLKD: jax.Array,
    segment_ids_BL: jax.Array,
    window: int | jax.Array = 0,
    block: int = 512,
) -> jax.Array:
    """Same result as `dot_product_attention(q, k, v, attention_mask(segment_ids, window))`."""
    return flash_attention_with_max_logit(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, window, block)[0]


def flash_attention_with_max_logit(
    q_BLHD: jax.Array,
    k_BLKD: jax.Array,
    v_BLKD: jax.Array,
    segment_ids_BL: jax.Array,
    window: int | jax.Array = 0,
    block: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """(attention output, the largest scaled score any query attends to: what QK-norm bounds)."""
    batch, length, num_heads, head_dim = q_BLHD.shape
    num_kv_heads = k_BLKD.shape[2]
    group = num_heads // num_kv_heads
    block = min(block, length)
    q = q_BLHD.reshape(batch, length, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    k = k_BLKD.transpose(0, 2, 1, 3)
    v = v_BLKD.transpose(0, 2, 1, 3)
    q = _pad_to_blocks(q, 3, block, 0)
    k, v = _pad_to_blocks(k, 2, block, 0), _pad_to_blocks(v, 2, block, 0)
    q_segments = _pad_to_blocks(segment_ids_BL, 1, block, -1)  # padding queries match no key
    k_segments = _pad_to_blocks(segment_ids_BL, 1, block, -2)
    out, row_max = _attention(q, k, v, q_segments, k_segments, jnp.asarray(window, jnp.int32), block)
    out = out[:, :, :, :length].transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, num_heads, head_dim), jnp.max(jax.lax.stop_gradient(row_max))
