"""The dense family: Llama / Qwen3-style pre-norm blocks (GQA, optional QK-norm as in PLaMo-100B, SwiGLU)."""

from __future__ import annotations

import ml_collections
from flax import nnx

from plamo_jax.models import flops
from plamo_jax.models.attention import Attention
from plamo_jax.models.family import (
    SHARED_ACTIVATION_SHARDS,
    FamilySpec,
    MeshSizes,
    require_divisible,
    require_positive,
)
from plamo_jax.models.layers import RMSNorm, SwiGLU


class DenseBlock(nnx.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.attn = Attention.from_config(cfg, qk_norm="shared" if cfg.qk_norm else "none", rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mlp = SwiGLU.from_config(cfg, cfg.mlp_dim, rngs=rngs)

    def __call__(self, x_BLD, segment_ids_BL, positions_BL, block_index):
        del block_index  # every dense layer is the same
        attended, max_logit = self.attn.attend(self.attn_norm(x_BLD), segment_ids_BL, positions_BL)
        x_BLD = x_BLD + attended
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
        return x_BLD, {"max_attention_logit": max_logit}

    def init_cache(self, batch: int, max_length: int) -> dict:
        return self.attn.init_cache(batch, max_length)

    def extend(self, x_BTD, positions_BT, start, cache, key_valid_BS, block_index):
        """The block on T new tokens with the attention's KV cache (decoder.Decoder.extend)."""
        del block_index
        attended, cache = self.attn.extend(self.attn_norm(x_BTD), positions_BT, start, cache, key_valid_BS)
        x_BTD = x_BTD + attended
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), cache


def validate_mlp(cfg: ml_collections.ConfigDict, sizes: MeshSizes) -> None:
    """model.mlp_dim: positive, split evenly by tensor parallelism (dense and hybrid MLPs)."""
    require_positive(cfg, "mlp_dim")
    require_divisible(cfg, "mlp_dim", sizes["tensor"], "the tensor-parallel mesh size mesh.tensor")


def forward_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    per_layer = flops.attention_flops_per_token(cfg, seq_len, cfg.attention_window)
    per_layer += flops.swiglu_flops_per_token(cfg.d_model, cfg.mlp_dim)
    return cfg.num_layers * per_layer + flops.lm_head_flops_per_token(cfg)


def default_hf_format(cfg: ml_collections.ConfigDict) -> str:
    return "qwen3" if cfg.qk_norm else "llama"


DENSE = FamilySpec(
    name="dense",
    block=DenseBlock,
    validate=validate_mlp,
    architecture_keys=("qk_norm", "mlp_dim"),
    forward_flops_per_token=forward_flops_per_token,
    activation_shards={**SHARED_ACTIVATION_SHARDS, "mlp_dim": "act_mlp"},
    hf_formats=("llama", "qwen3"),
    default_hf_format=default_hf_format,
    megatron_formula=True,
    cached_decoding=True,
)
