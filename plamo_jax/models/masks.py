"""Which keys each query attends to: causal, same document, within a window (training and cached decoding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def static_window(window) -> int | None:
    """The window as a Python int, or None when it is traced (layers of a scanned stack differ): kernels
    that build their masks ahead of tracing (cuDNN's window, splash) take only the former."""
    if isinstance(window, (int, np.integer)):
        return int(window)
    return None


def attention_mask(segment_ids_BL: jax.Array, window: int | jax.Array = 0,
                   tokens_L: jax.Array | None = None) -> jax.Array:
    """[B, 1, L, L] boolean mask: causal, same document, and within `window` tokens when window > 0.

    `window` may be a traced scalar (layers of a scanned stack can differ); 0 means unlimited.
    tokens_L: each position's token index in the row when the layout permutes them (context
    parallelism's load balancing); by default the positions in order.
    """
    length = segment_ids_BL.shape[1]
    tokens = jnp.arange(length) if tokens_L is None else jnp.asarray(tokens_L)
    query = tokens[:, None]
    key = tokens[None, :]
    allowed = key <= query
    window = jnp.asarray(window)
    allowed = allowed & ((window <= 0) | (query - key < window))
    same_document = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return (allowed[None] & same_document)[:, None]


def cached_attention_mask(query_columns_T: jax.Array, key_valid_BS: jax.Array,
                          window: int | jax.Array = 0) -> jax.Array:
    """[B, 1, T, S] mask of T queries at cache columns `query_columns_T` over S cached columns: causal,
    real keys only, and within `window` columns when window > 0 (a row's columns are consecutive positions).
    """
    distance_TS = query_columns_T[:, None] - jnp.arange(key_valid_BS.shape[1])[None, :]
    window = jnp.asarray(window)
    allowed_TS = (distance_TS >= 0) & ((window <= 0) | (distance_TS < window))
    return (allowed_TS[None] & key_valid_BS[:, None, :])[:, None]
