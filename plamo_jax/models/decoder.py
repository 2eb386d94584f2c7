"""One decoder for every family: embeddings, a scanned stack of blocks, final norm, LM head.

The block kind comes from the family registry; blocks are created with `nnx.vmap` (parameters stacked
along a leading `layers` axis) and applied with `nnx.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from plamo_jax.models import registry
from plamo_jax.models.attention import Attention
from plamo_jax.models.layers import RMSNorm, SwiGLU, normal, param
from plamo_jax.parallel.rules import constrain

REMAT_POLICIES = {
    "none": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def compute_dtype(cfg: ml_collections.ConfigDict):
    return jnp.dtype(cfg.dtype)


def output_init_std(cfg: ml_collections.ConfigDict) -> float:
    """Residual-branch output projections start smaller with depth (GPT-2 / Megatron scaling)."""
    return cfg.init_std / (2 * cfg.num_layers) ** 0.5


def make_attention(cfg: ml_collections.ConfigDict, *, qk_norm: str, rngs: nnx.Rngs) -> Attention:
    return Attention(
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
        qk_norm=qk_norm,
        init_std=cfg.init_std,
        out_init_std=output_init_std(cfg),
        dtype=compute_dtype(cfg),
        rngs=rngs,
        fp8=cfg.fp8,
        impl=cfg.attention_impl,
        block=cfg.attention_block,
    )


class DenseBlock(nnx.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.attn = make_attention(cfg, qk_norm="shared" if cfg.qk_norm else "none", rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mlp = SwiGLU(
            cfg.d_model,
            cfg.mlp_dim,
            init_std=cfg.init_std,
            out_init_std=output_init_std(cfg),
            dtype=compute_dtype(cfg),
            rngs=rngs,
            fp8=cfg.fp8,
        )

    def __call__(self, x_BLD, segment_ids_BL, positions_BL, block_index):
        del block_index  # every dense layer is the same
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), segment_ids_BL, positions_BL)
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
        return x_BLD, {}


class Decoder(nnx.Module):
    """Causal LM: __call__(input_ids, segment_ids, positions) -> (fp32 logits [B, L, V], aux)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        family = registry.get_family(cfg.family)
        self.dtype = cfg.dtype
        self.num_blocks = family.num_blocks(cfg)
        self.remat_policy = cfg.remat
        self.scan_unroll = cfg.scan_unroll
        self.embed = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        block_class = family.block_class()

        @nnx.split_rngs(splits=self.num_blocks)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(block_rngs: nnx.Rngs):
            return block_class(cfg, rngs=block_rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, offset=family.final_norm_offset, rngs=rngs)
        self.lm_head = nnx.data(
            None
            if cfg.tie_embeddings
            else param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
        )

    def embed_tokens(self, input_ids_BL: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], input_ids_BL, axis=0).astype(self.dtype)
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        x = self.final_norm(x_BLD)
        dtype = self.dtype
        if self.lm_head is None:
            logits = jnp.einsum(
                "bld,vd->blv", x, self.embed[...].astype(dtype), preferred_element_type=jnp.float32
            )
        else:
            logits = jnp.einsum(
                "bld,dv->blv", x, self.lm_head[...].astype(dtype), preferred_element_type=jnp.float32
            )
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def __call__(self, input_ids_BL: jax.Array, segment_ids_BL: jax.Array, positions_BL: jax.Array):
        x = self.embed_tokens(input_ids_BL)

        def apply_block(block, x_BLD, block_index):
            return block(x_BLD, segment_ids_BL, positions_BL, block_index)

        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            apply_block = nnx.remat(apply_block, policy=policy)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), unroll=self.scan_unroll)
        def run_stack(x_BLD, block, block_index):
            x_BLD, aux = apply_block(block, x_BLD, block_index)
            return x_BLD, aux

        x, aux_per_block = run_stack(x, self.blocks, jnp.arange(self.num_blocks))
        return self.logits(x), aux_per_block
