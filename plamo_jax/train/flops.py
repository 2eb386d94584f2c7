"""Model FLOPs per token (training = 3 x forward) and peak device FLOP/s for MFU.

Matmul FLOPs count 2 per multiply-add. Attention score and value products are counted over the keys
each query may see: causal masking halves them; a sliding window caps them.
"""

from __future__ import annotations

import jax
import ml_collections

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_FLOPS_BY_DEVICE_KIND = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
}


def peak_flops_per_device(configured: float = 0.0, device: jax.Device | None = None) -> float | None:
    """The configured peak if set, else the table's entry for this device kind (None if unknown)."""
    if configured > 0:
        return configured
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name in sorted(PEAK_FLOPS_BY_DEVICE_KIND, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS_BY_DEVICE_KIND[name]
    return None


def mean_attended_keys(seq_len: int, window: int = 0) -> float:
    """Average number of keys a query attends to under causal (and optional window) masking."""
    if window <= 0 or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 0..window-1 see pos+1 keys; the rest see `window` keys
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int, window: int = 0) -> float:
    d, heads, kv_heads, head_dim = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    projections = 2 * d * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v
    scores_and_values = 2 * 2 * heads * head_dim * mean_attended_keys(seq_len, window)
    return projections + scores_and_values


def mlp_flops_per_token(cfg: ml_collections.ConfigDict) -> float:
    """SwiGLU (3 matmuls); for MoE the router plus the k routed and the shared experts a token uses."""
    if cfg.family == "moe":
        experts_used = cfg.num_experts_per_token + cfg.num_shared_experts
        return 2 * cfg.d_model * cfg.num_experts + 2 * 3 * cfg.d_model * cfg.expert_mlp_dim * experts_used
    return 2 * 3 * cfg.d_model * cfg.mlp_dim


def mamba_flops_per_token(cfg: ml_collections.ConfigDict) -> float:
    """PLaMo 2's Mamba mixer: projections, depthwise conv, and the recurrence itself.

    The recurrence is counted as the sequential scan does it (state update x B^T and readout C h,
    2 x inner x state_dim each); the chunked SSD spends more to use matrix units.
    """
    d, inner, state = cfg.d_model, cfg.ssm_num_heads * cfg.ssm_head_dim, cfg.ssm_state_dim
    dt_dim = max(64, d // 16)
    projections = 2 * d * 2 * inner + 2 * inner * (2 * state + dt_dim) + 2 * dt_dim * cfg.ssm_num_heads
    return projections + 2 * inner * cfg.ssm_conv_width + 4 * inner * state + 2 * inner * d


def forward_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """Forward FLOPs per token: every layer's mixer and MLP, plus the LM head."""
    attention = attention_flops_per_token(cfg, seq_len, cfg.attention_window)
    mixers = cfg.num_layers * attention
    if cfg.family == "hybrid":
        # one attention layer per group of mamba_step layers; full-attention layers see every key
        groups = cfg.num_layers // cfg.mamba_step
        full = [i for i in cfg.full_attention_layers if i % cfg.mamba_step == cfg.mamba_step // 2]
        mixers = (groups - len(full)) * attention + len(full) * attention_flops_per_token(cfg, seq_len)
        mixers += (cfg.num_layers - groups) * mamba_flops_per_token(cfg)
    return mixers + cfg.num_layers * mlp_flops_per_token(cfg) + 2 * cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """Forward + backward (2 x forward) model FLOPs; rematerialisation is not counted (MFU, not HFU)."""
    return 3 * forward_flops_per_token(cfg, seq_len)
