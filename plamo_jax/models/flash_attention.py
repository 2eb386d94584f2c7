"""Blockwise (flash-style) attention in plain JAX: memory linear in the sequence, exact softmax.

Queries and keys are cut into blocks; each query block walks the key blocks with an online
softmax (running max, normaliser, weighted sum). The backward pass is written out (FlashAttention-2
style) and recomputes each block's probabilities from the saved log-normaliser, so neither pass
holds an [L, L] score matrix. Blocks that the causal mask (or the window) rules out entirely are
skipped. Masking is the dense path's: causal by index, same segment id, and within `window` tokens
when window > 0.

`forward_blocks` / `backward_blocks` take the queries' and keys' token indices explicitly and may have
different query and key lengths: context parallelism (models/context_attention.py) calls them on a shard's
queries against keys held elsewhere in the sequence.
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


def _block_mask(q_tokens, k_tokens, q_segments, k_segments, window) -> jax.Array:
    """[B, block, block] allowed(query, key) for query and key blocks at token indices q/k_tokens."""
    query = q_tokens[:, None]
    key = k_tokens[None, :]
    allowed = (key <= query) & ((window <= 0) | (query - key < window))
    return allowed[None] & (q_segments[:, :, None] == k_segments[:, None, :])


def _block_is_live(q_tokens, k_tokens, window) -> jax.Array:
    """Whether any (query, key) pair of two blocks of consecutive token indices can pass the causal and
    window masks."""
    causal = jnp.min(k_tokens) <= jnp.max(q_tokens)
    in_window = (window <= 0) | (jnp.min(q_tokens) - jnp.max(k_tokens) < window)
    return causal & in_window


def _tie_masks_to(q, *mask_inputs):
    """(q, *mask_inputs) through an optimization barrier, so that the masks depend on q.

    Token indices, segment ids and the window are the same for every layer of a scanned stack. Without
    the barrier, JAX's partial evaluation of the differentiated layer scan hoists everything computed from
    them alone out of the loop: every (query block, key block) mask, stacked, held for the whole step (an
    [L, L] boolean per head, hundreds of GiB at 128K tokens).
    """
    return jax.lax.optimization_barrier((q, *mask_inputs))


def forward_blocks(q, k, v, q_segments, k_segments, q_tokens, k_tokens, window, block):
    """q [B, K, G, Lq, D], k/v [B, K, Lk, D] (lengths multiples of block), token indices q_tokens [Lq],
    k_tokens [Lk] -> (out like q, lse [B, K, G, Lq], the largest attended score of each query)."""
    q, q_segments, k_segments, q_tokens, k_tokens, window = _tie_masks_to(q, q_segments, k_segments, q_tokens,
                                                                          k_tokens, window)
    batch, kv_heads, group, length, head_dim = q.shape
    scale = head_dim**-0.5
    num_blocks = length // block
    num_key_blocks = k.shape[2] // block

    def one_query_block(q_index):
        q_start = q_index * block
        q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, block, axis=3)
        q_seg = jax.lax.dynamic_slice_in_dim(q_segments, q_start, block, axis=1)
        q_tok = jax.lax.dynamic_slice_in_dim(q_tokens, q_start, block)

        def visit(carry, k_index):
            k_start = k_index * block
            k_tok = jax.lax.dynamic_slice_in_dim(k_tokens, k_start, block)

            def update(carry):
                running_max, normaliser, total = carry
                k_blk = jax.lax.dynamic_slice_in_dim(k, k_start, block, axis=2)
                v_blk = jax.lax.dynamic_slice_in_dim(v, k_start, block, axis=2)
                k_seg = jax.lax.dynamic_slice_in_dim(k_segments, k_start, block, axis=1)
                scores = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
                mask = _block_mask(q_tok, k_tok, q_seg, k_seg, window)[:, None, None]
                scores = jnp.where(mask, scores * scale, _NEG_INF)
                new_max = jnp.maximum(running_max, scores.max(axis=-1))
                safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
                probs = jnp.exp(scores - safe_max[..., None])
                rescale = jnp.exp(jnp.where(jnp.isfinite(running_max), running_max - safe_max, _NEG_INF))
                normaliser = normaliser * rescale + probs.sum(axis=-1)
                weighted = jnp.einsum("bkgqs,bksd->bkgqd", probs.astype(v.dtype), v_blk,
                                      preferred_element_type=jnp.float32)
                return new_max, normaliser, total * rescale[..., None] + weighted

            live = _block_is_live(q_tok, k_tok, window)
            return jax.lax.cond(live, update, lambda carry: carry, carry), None

        init = (
            jnp.full((batch, kv_heads, group, block), _NEG_INF, jnp.float32),
            jnp.zeros((batch, kv_heads, group, block), jnp.float32),
            jnp.zeros((batch, kv_heads, group, block, head_dim), jnp.float32),
        )
        (running_max, normaliser, total), _ = jax.lax.scan(visit, init, jnp.arange(num_key_blocks))
        empty = normaliser == 0  # padding queries see no key
        out = jnp.where(empty[..., None], 0.0, total / jnp.where(empty, 1.0, normaliser)[..., None])
        lse = jnp.where(empty, _NEG_INF, running_max + jnp.log(jnp.where(empty, 1.0, normaliser)))
        return out, lse, running_max

    outs, lses, maxima = jax.lax.map(one_query_block, jnp.arange(num_blocks))  # [n, B, K, G, block, ...]
    out = jnp.moveaxis(outs, 0, 3).reshape(batch, kv_heads, group, length, head_dim)
    lse = jnp.moveaxis(lses, 0, 3).reshape(batch, kv_heads, group, length)
    row_max = jnp.moveaxis(maxima, 0, 3).reshape(batch, kv_heads, group, length)
    return out, lse, row_max  # fp32: context parallelism merges partial outputs before the cast


def backward_blocks(q, k, v, q_segments, k_segments, q_tokens, k_tokens, window, block, out, lse, d_out):
    """fp32 (d_q, d_k, d_v) of `forward_blocks`'s queries against these keys, given the output and
    log-normaliser of the queries' whole softmax (which may span keys beyond k: context parallelism)."""
    q, q_segments, k_segments, q_tokens, k_tokens, window = _tie_masks_to(q, q_segments, k_segments, q_tokens,
                                                                          k_tokens, window)
    batch, kv_heads, group, length, head_dim = q.shape
    scale = head_dim**-0.5
    num_blocks = length // block
    num_key_blocks = k.shape[2] // block
    delta = jnp.einsum("bkgqd,bkgqd->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def one_key_block(d_q, k_index):
        k_start = k_index * block
        k_tok = jax.lax.dynamic_slice_in_dim(k_tokens, k_start, block)
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
                q_tok = jax.lax.dynamic_slice_in_dim(q_tokens, q_start, block)
                scores = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
                mask = _block_mask(q_tok, k_tok, q_seg, k_seg, window)[:, None, None]
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

            q_tok = jax.lax.dynamic_slice_in_dim(q_tokens, q_start, block)
            live = _block_is_live(q_tok, k_tok, window)
            return jax.lax.cond(live, update, lambda carry: carry, carry), None

        zeros = jnp.zeros((batch, kv_heads, block, head_dim), jnp.float32)
        (d_q, d_k, d_v), _ = jax.lax.scan(visit, (d_q, zeros, zeros), jnp.arange(num_blocks))
        return d_q, (d_k, d_v)

    d_q, (d_ks, d_vs) = jax.lax.scan(one_key_block, jnp.zeros(q.shape, jnp.float32),
                                     jnp.arange(num_key_blocks))
    d_k = jnp.moveaxis(d_ks, 0, 2).reshape(k.shape)
    d_v = jnp.moveaxis(d_vs, 0, 2).reshape(v.shape)
    return d_q, d_k, d_v


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def blockwise_attention(q, k, v, q_segments, k_segments, q_tokens, k_tokens, window, block):
    """(out, largest attended score per query) in the kernel's layout (q [B, K, G, Lq, D], k/v
    [B, K, Lk, D]) over explicit token indices; the score maximum is a statistic (no gradient)."""
    out, _, row_max = forward_blocks(q, k, v, q_segments, k_segments, q_tokens, k_tokens, window, block)
    return out.astype(q.dtype), row_max


def _attention_fwd(q, k, v, q_segments, k_segments, q_tokens, k_tokens, window, block):
    out, lse, row_max = forward_blocks(q, k, v, q_segments, k_segments, q_tokens, k_tokens, window, block)
    out = out.astype(q.dtype)
    return (out, row_max), (q, k, v, q_segments, k_segments, q_tokens, k_tokens, window, out, lse)


def _attention_bwd(block, residuals, cotangents):
    d_out, _ = cotangents  # the score maximum is only observed (its cotangent is zero)
    q, k, v, q_segments, k_segments, q_tokens, k_tokens, window, out, lse = residuals
    d_q, d_k, d_v = backward_blocks(q, k, v, q_segments, k_segments, q_tokens, k_tokens, window, block,
                                    out, lse, d_out)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None, None, None, None


blockwise_attention.defvjp(_attention_fwd, _attention_bwd)


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
    tokens_L: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(attention output, the largest scaled score any query attends to: what QK-norm bounds).

    tokens_L: each position's token index in the row, for a permuted layout (context parallelism's
    load balancing); by default the positions in order.
    """
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
    padded = jnp.arange(q.shape[3], dtype=jnp.int32)
    if tokens_L is None:
        tokens = padded
    else:
        tokens = jnp.where(padded < length, jnp.pad(tokens_L, (0, q.shape[3] - length)), padded)
    out, row_max = blockwise_attention(q, k, v, q_segments, k_segments, tokens, tokens,
                                       jnp.asarray(window, jnp.int32), block)
    out = out[:, :, :, :length].transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, num_heads, head_dim), jnp.max(jax.lax.stop_gradient(row_max))
