"""The largest attention logit a query attends to, for kernels that do not return it (cuDNN, splash).

What QK-norm bounds and every attention path reports as `max_attention_logit`. Computed forward only
(the inputs pass through stop_gradient), a block of queries at a time, in fp32 as the dense path has it:
one more score product per layer, never an [L, L] score matrix per head at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QUERY_BLOCK = 512


def max_allowed_logit(q_BLHD: jax.Array, k_BLKD: jax.Array, mask_B1LL: jax.Array,
                      query_block: int = QUERY_BLOCK) -> jax.Array:
    """max over allowed (query, key) of q.k / sqrt(D), in fp32 as the dense path has it; query blocks
    at a time, so the transient scores are [B, H, block, L] rather than [B, H, L, L]."""
    batch, length, num_heads, head_dim = q_BLHD.shape
    num_kv_heads = k_BLKD.shape[2]
    block = query_block if length % query_block == 0 else length
    q = jax.lax.stop_gradient(q_BLHD).reshape(batch, length // block, block, num_kv_heads,
                                              num_heads // num_kv_heads, head_dim)
    k = jax.lax.stop_gradient(k_BLKD)
    mask = mask_B1LL[:, 0].reshape(batch, length // block, block, length)

    def block_max(args):
        q_block, mask_block = args  # [B, block, K, G, D], [B, block, L]
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q_block, k, preferred_element_type=jnp.float32)
        return jnp.max(jnp.where(mask_block[:, None, None], scores, -jnp.inf))

    per_block = jax.lax.map(block_max, (jnp.moveaxis(q, 1, 0), jnp.moveaxis(mask, 1, 0)))
    return jnp.max(per_block) * (head_dim**-0.5)
