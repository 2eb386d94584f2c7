"""One decoder for every family: embeddings, a scanned stack of blocks, final norm, LM head.

The block comes from the family's spec (models/registry.py); blocks are created with `nnx.vmap`
(parameters stacked along a leading `layers` axis) and applied with `nnx.scan`, so compile time does
not grow with depth. With `model.scan_layers=False` training runs the same stacked blocks in a Python
loop instead: compile time grows with depth, but the per-layer activations the backward pass keeps are
separate buffers rather than slices of stacked [layers, ...] arrays, which XLA zero-fills and writes a
layer at a time every step (on CPU, 0.9 s of a 10 s step of the 125M benchmark shape). Families with
`cached_decoding` also decode token by token with a KV cache (`init_cache`, `extend`), stacked along the
same blocks axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from plamo_jax.models import registry
from plamo_jax.models.layers import RMSNorm, normal, param
from plamo_jax.models.pipelined_stack import BLOCK_INPUT, pipelined_stack
from plamo_jax.models.projection import weight_einsum
from plamo_jax.parallel import pipeline
from plamo_jax.parallel.rules import MESH_AXES, constrain

UNSHARDED = {axis: 1 for axis in MESH_AXES}
REMAT_POLICIES = {
    "none": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack_layers(stacked: list[jax.Array], count: int) -> list[list[jax.Array]]:
    """[count, ...] arrays -> per layer, the list of that layer's slices. The backward pass stacks the
    layers' gradients in one concatenation (autodiff would pad each slice's gradient to the full
    stacked shape and add `count` of them)."""
    return [[array[index] for array in stacked] for index in range(count)]


def _unstack_forward(stacked, count):
    return unstack_layers(stacked, count), None


def _unstack_backward(count, _, per_layer_grads):
    leaves = range(len(per_layer_grads[0]))
    return ([jnp.stack([layer[leaf] for layer in per_layer_grads]) for leaf in leaves],)


unstack_layers.defvjp(_unstack_forward, _unstack_backward)


class Decoder(nnx.Module):
    """Causal LM: __call__(input_ids, segment_ids, positions) -> (fp32 logits [B, L, V], aux)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        family = registry.get_family(cfg.family)
        registry.validate_model(cfg, UNSHARDED)  # the run builder checks again against the real mesh
        self.dtype = cfg.dtype
        self.num_blocks = family.num_blocks(cfg)
        self.remat_policy = cfg.remat
        self.scan_unroll = cfg.scan_unroll
        self.scan_layers = cfg.scan_layers
        self.num_layers = cfg.num_layers
        self.pipeline = pipeline.PipelineSettings.from_config(cfg)
        self.rows_independent = family.rows_independent
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
        return self.head()(self.final_norm(x_BLD))

    def head(self):
        """final-normed hidden states [B, L, D] -> fp32 logits [B, L, V], as a function of arrays only
        (the weights read once here), so that a loss can call it inside its own transforms."""
        tied = self.lm_head is None
        weight = (self.embed if tied else self.lm_head)[...].astype(self.dtype)
        subscripts = "bld,vd->blv" if tied else "bld,dv->blv"

        def head(x_BLD: jax.Array) -> jax.Array:
            # weight_einsum: the weight's gradient does not read the logits' gradient transposed
            logits = weight_einsum(subscripts, x_BLD, weight, jnp.float32)
            return constrain(logits, ("act_batch", "act_length", "act_vocab"))

        return head

    def run_blocks(self, blocks: nnx.Module, x_BLD, segment_ids_BL, positions_BL,
                   block_indices) -> tuple[jax.Array, dict]:
        """Scan `blocks` (stacked along their first axis) over x: (x, per-block aux stacked)."""

        def apply_block(block, x_BLD, block_index):
            # the name lets the pipeline's iteration checkpoint keep block inputs (pipelined_stack.py)
            return block(checkpoint_name(x_BLD, BLOCK_INPUT), segment_ids_BL, positions_BL, block_index)

        if self.remat_policy != "none":
            apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[self.remat_policy])

        if not self.scan_layers:
            graphdef, stacked = nnx.split(blocks)
            leaves, treedef = jax.tree.flatten(stacked)
            aux_per_block = []
            for index, layer_leaves in enumerate(unstack_layers(leaves, len(block_indices))):
                block = nnx.merge(graphdef, jax.tree.unflatten(treedef, layer_leaves))
                x_BLD, aux = apply_block(block, x_BLD, block_indices[index])
                aux_per_block.append(aux)
            return x_BLD, jax.tree.map(lambda *per_block: jnp.stack(per_block), *aux_per_block)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), unroll=self.scan_unroll)
        def run_stack(x_BLD, block, block_index):
            x_BLD, aux = apply_block(block, x_BLD, block_index)
            return x_BLD, aux

        return run_stack(x_BLD, blocks, block_indices)

    def __call__(self, input_ids_BL: jax.Array, segment_ids_BL: jax.Array, positions_BL: jax.Array):
        x, aux_per_block = self.hidden_states(input_ids_BL, segment_ids_BL, positions_BL)
        return self.logits(x), aux_per_block

    def hidden_states(self, input_ids_BL: jax.Array, segment_ids_BL: jax.Array,
                      positions_BL: jax.Array) -> tuple[jax.Array, dict]:
        """(the stack's output [B, L, D] before the final norm, per-block aux)."""
        x = self.embed_tokens(input_ids_BL)
        stages = pipeline.stage_count()
        plan = self.pipeline.plan(self.num_blocks, stages, self.num_layers) if stages > 1 else None
        if plan is not None and x.shape[0] % plan.microbatches == 0:
            x, aux_per_block = pipelined_stack(self.blocks, self.run_blocks, x, segment_ids_BL, positions_BL,
                                               plan, self.remat_policy, self.pipeline.remat_iterations,
                                               self.rows_independent)
        else:  # no stages, or a batch (an evaluation's) that the microbatches do not divide: XLA gathers
            x, aux_per_block = self.run_blocks(self.blocks, x, segment_ids_BL, positions_BL,
                                               jnp.arange(self.num_blocks))
        return x, aux_per_block

    # --- cached decoding (families with FamilySpec.cached_decoding) -----------------------------------

    def init_cache(self, batch: int, max_length: int) -> dict[str, jax.Array]:
        """Every block's empty cache for `max_length` columns, stacked along a leading blocks axis."""

        @nnx.vmap(in_axes=0, out_axes=0)
        def per_block(block):
            return block.init_cache(batch, max_length)

        return per_block(self.blocks)

    def extend(self, input_ids_BT: jax.Array, positions_BT: jax.Array, start: int | jax.Array,
               cache: dict[str, jax.Array], key_valid_BS: jax.Array) -> tuple[jax.Array, dict]:
        """T new tokens at cache columns start..start+T-1: (fp32 logits [B, T, V], the updated cache).

        Prefill is `extend(prompts, positions, 0, init_cache(B, S), valid)`; decoding feeds one token
        per call. `key_valid_BS` marks the columns that hold (or will hold) a row's real tokens.
        """
        x = self.embed_tokens(input_ids_BT)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0), unroll=self.scan_unroll)
        def run_stack(x_BTD, block, block_cache, block_index):
            return block.extend(x_BTD, positions_BT, start, block_cache, key_valid_BS, block_index)

        x, cache = run_stack(x, self.blocks, cache, jnp.arange(self.num_blocks))
        return self.logits(x), cache
