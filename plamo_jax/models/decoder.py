"""One decoder for every family: embeddings, a scanned stack of blocks, final norm, LM head.

The block comes from the family's spec (models/registry.py); blocks are created with `nnx.vmap`
(parameters stacked along a leading `layers` axis) and applied with `nnx.scan`, so compile time does
not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from plamo_jax.models import registry
from plamo_jax.models.layers import RMSNorm, normal, param
from plamo_jax.parallel.rules import MESH_AXES, constrain

UNSHARDED = {axis: 1 for axis in MESH_AXES}
REMAT_POLICIES = {
    "none": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Decoder(nnx.Module):
    """Causal LM: __call__(input_ids, segment_ids, positions) -> (fp32 logits [B, L, V], aux)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        family = registry.get_family(cfg.family)
        registry.validate_model(cfg, UNSHARDED)  # the run builder checks again against the real mesh
        self.dtype = cfg.dtype
        self.num_blocks = family.num_blocks(cfg)
        self.remat_policy = cfg.remat
        self.scan_unroll = cfg.scan_unroll
        self.embed = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        block_class = family.block

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
