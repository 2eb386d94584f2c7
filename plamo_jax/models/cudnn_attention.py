"""cuDNN's fused flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`.

What cuDNN takes (cuDNN 9 on Hopper, as JAX checks it): bfloat16 or float16 inputs, head_dim a multiple
of 8 up to 256, a causal mask it skips tiles for, and a left sliding window of a static length. What our
attention needs beyond that, and what this module chose:

- Packed documents. cuDNN's own packed layout wants each row's document offsets padded to a static
  maximum count, which a packed batch does not have. The same-document mask travels instead as JAX's
  boolean `mask`, which JAX turns into a constant additive bias (no bias gradient is computed); the
  causal part and the window stay in the kernel, so cuDNN still skips the tiles above the diagonal.
  The bias is a [B, 1, L, L] array in the compute dtype per call: small at a few thousand tokens,
  which is why `auto` stops choosing cuDNN past `CUDNN_AUTO_MAX_LENGTH` (flash attention there).
- A window that differs between layers of a scanned stack (a traced scalar), or a permuted token
  order (context parallelism's load balancing): the whole mask (causal, document, window) goes in the
  bias and cuDNN runs unmasked.
- The largest attention logit, the health statistic every attention path reports, is not among
  cuDNN's outputs (it returns the log-sum-exp, an upper bound): it is computed exactly beside the
  kernel, forward only (models/attention_statistics.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from plamo_jax.models.attention_statistics import max_allowed_logit
from plamo_jax.models.masks import attention_mask, static_window

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 256
# `auto` uses cuDNN up to this many tokens per row; the document bias grows with the square of it.
CUDNN_AUTO_MAX_LENGTH = 16384


def cudnn_unsupported(dtype, head_dim: int) -> str | None:
    """Why cuDNN's fused attention cannot take these inputs, or None when it can."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        return f"cuDNN attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"cuDNN attention needs head_dim a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
    return None


def cudnn_attention_with_max_logit(
    q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, segment_ids_BL: jax.Array,
    window: int | jax.Array = 0, tokens_L=None, *, implementation: str = "cudnn",
) -> tuple[jax.Array, jax.Array]:
    """(attention output [B, L, H, D], largest allowed scaled score): causal, same document, window.

    implementation="xla" runs JAX's reference path with the very same arguments (how CPU tests check
    the masking this function asks cuDNN for).
    """
    full_mask = attention_mask(segment_ids_BL, window, tokens_L)
    window_length = static_window(window)
    if tokens_L is None and window_length is not None:
        same_document = (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])[:, None]
        # cuDNN's window (pos - w, pos] with w = left + 1: ours keeps keys with query - key < window.
        local_window = (window_length - 1, 0) if window_length > 0 else None
        attended = jax.nn.dot_product_attention(
            q_BLHD, k_BLKD, v_BLKD, mask=same_document, is_causal=True, local_window_size=local_window,
            implementation=implementation)
    else:
        attended = jax.nn.dot_product_attention(q_BLHD, k_BLKD, v_BLKD, mask=full_mask,
                                                implementation=implementation)
    return attended, max_allowed_logit(q_BLHD, k_BLKD, full_mask)
