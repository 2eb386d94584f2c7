"""Forward FLOPs per token of the layers families are built from (2 FLOPs per multiply-add).

Attention score and value products are counted over the keys each query may see: causal masking
halves them; a sliding window caps them. Each family's spec adds these up for its own blocks.
"""

from __future__ import annotations

import ml_collections


def mean_attended_keys(seq_len: int, window: int = 0) -> float:
    """Average number of keys a query attends to under causal (and optional window) masking."""
    if window <= 0 or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 0..window-1 see pos+1 keys; the rest see `window` keys
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int, window: int = 0) -> float:
    """q, k, v, o projections plus the score and value products over the attended keys."""
    d, heads, kv_heads, head_dim = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    projections = 2 * d * head_dim * (2 * heads + 2 * kv_heads)
    scores_and_values = 2 * 2 * heads * head_dim * mean_attended_keys(seq_len, window)
    return projections + scores_and_values


def swiglu_flops_per_token(d_model: int, width: int) -> float:
    """gate, up and down projections."""
    return 2 * 3 * d_model * width


def lm_head_flops_per_token(cfg: ml_collections.ConfigDict) -> float:
    return 2 * cfg.d_model * cfg.vocab_size
