"""The decoder's scanned blocks run as a pipeline over the `stage` mesh axis (parallel/pipeline.py).

SPMD, as in MaxText: the blocks' parameters [num_blocks, ...] become [S, R, K, ...] with S sharded over
`stage`, and every iteration one `jax.vmap(..., spmd_axis_name="stage")` call runs each stage's K blocks
on the microbatch it holds. `jnp.roll` along the stage dimension (a collective permute) hands each
output to the next stage. A stream of M microbatch activations, replicated over the stages, feeds the
first stage and collects what leaves the last one: the embedded inputs at first, a microbatch's output
after its last repeat.

Parameters stay in the canonical block order (checkpoints, exports and evaluation do not depend on the
stage count). Under GPipe (R = 1) a stage's blocks are already the contiguous shard its devices hold;
the circular schedule (R > 1) regathers them in stage-major order inside the step, moving (R - 1) / R of
each device's block parameters once per step (and their gradients back).

Rematerialisation is per iteration: with model.remat != "none" each stage's K blocks on one microbatch
are one checkpoint with that policy, so the backward pass keeps only the stage inputs of the iterations
(M + S - 1 microbatch activations per device under GPipe) and recomputes the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from plamo_jax.parallel.pipeline import STAGE_AXIS, PipelinePlan
from plamo_jax.parallel.rules import constrain

RunBlocks = Callable[[nnx.Module, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]
MAX_PREFIX = "max_"  # per-block statistics combined by maximum over microbatches (others are averaged)

STAGE_ACTIVATION = ("act_stage", "act_batch", "act_length", "act_embed")
STAGE_IDS = ("act_stage", "act_batch", "act_length")


def split_microbatches(x: jax.Array, count: int) -> jax.Array:
    """[B, ...] -> [count, B / count, ...], every count-th row (each microbatch keeps the batch sharding;
    the same split as gradient accumulation in train/step.py)."""
    return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _stage_major(state: nnx.State, plan: PipelinePlan) -> nnx.State:
    """Block parameters [num_blocks, ...] -> [S, R, K, ...], S sharded over `stage`."""
    order = plan.stage_major_order()

    def one(variable: nnx.Variable) -> nnx.Variable:
        value = variable[...]
        if plan.repeats > 1:
            value = jnp.take(value, order, axis=0)
        value = value.reshape(plan.stages, plan.repeats, plan.blocks_per_chunk, *value.shape[1:])
        axes = tuple(variable.get_metadata().get("out_sharding") or (None,) * (value.ndim - 2))
        return variable.replace(constrain(value, ("layers", None, None, *axes[1:])))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _canonical_aux(acc: jax.Array, plan: PipelinePlan) -> jax.Array:
    """[S, R, K, ...] per-block values -> [num_blocks, ...] in canonical order ((r * S + s) * K + k)."""
    return acc.swapaxes(0, 1).reshape(plan.num_blocks, *acc.shape[3:])


def pipelined_stack(blocks: nnx.Module, run_blocks: RunBlocks, x_BLD: jax.Array, segment_ids_BL: jax.Array,
                    positions_BL: jax.Array, plan: PipelinePlan, remat_policy) -> tuple[jax.Array, dict]:
    """(x after every block, per-block aux [num_blocks, ...]) like the plain scan over `blocks`.

    `run_blocks(blocks, x, segment_ids, positions, block_indices)` runs a stack of blocks (the decoder's
    scan). Aux values are per-microbatch block statistics: averaged over the M microbatches (the MoE
    auxiliary losses of gradient accumulation over the same microbatches), `max_*` maximised.
    remat_policy: a jax.checkpoint policy, or the string "none" for no rematerialisation.
    """
    S, R, M = plan.stages, plan.repeats, plan.microbatches
    graphdef, state = nnx.split(blocks)
    stage_state = _stage_major(state, plan)
    block_indices = jnp.asarray(plan.stage_major_order().reshape(S, R, plan.blocks_per_chunk), jnp.int32)

    def stage(stage_params, repeat, x, segment_ids, positions, indices):
        chunk = jax.tree.map(lambda leaf: leaf[repeat], stage_params)
        return run_blocks(nnx.merge(graphdef, chunk), x, segment_ids, positions, indices[repeat])

    if remat_policy != "none":
        stage = jax.checkpoint(stage, policy=remat_policy)
    stages = jax.vmap(stage, spmd_axis_name=STAGE_AXIS)

    stream = split_microbatches(x_BLD, M)  # [M, B/M, L, D]
    segments_M, positions_M = split_microbatches(segment_ids_BL, M), split_microbatches(positions_BL, M)
    held = constrain(jnp.zeros((S, *stream.shape[1:]), stream.dtype), STAGE_ACTIVATION)
    aux_shapes = jax.eval_shape(stages, stage_state, jnp.zeros((S,), jnp.int32), held, segments_M[:S],
                                positions_M[:S], block_indices)[1]
    aux_acc = {name: jnp.full((S, R, *shape.shape[1:]), -jnp.inf if name.startswith(MAX_PREFIX) else 0,
                              jnp.float32) for name, shape in aux_shapes.items()}

    def iteration(carry, t):
        held, stream, aux_acc = carry
        passes = t - jnp.arange(S)
        active = (passes >= 0) & (passes < R * M)
        passes = jnp.clip(passes, 0, R * M - 1)
        microbatch, repeat = passes % M, passes // M
        held = constrain(held.at[0].set(stream[microbatch[0]]), STAGE_ACTIVATION)
        segments = constrain(segments_M[microbatch], STAGE_IDS)
        positions = constrain(positions_M[microbatch], STAGE_IDS)
        out, aux = stages(stage_state, repeat, held, segments, positions, block_indices)
        out = constrain(out, STAGE_ACTIVATION)
        for name, value in aux.items():
            value = value.astype(jnp.float32)
            mask = active.reshape(S, *(1,) * (value.ndim - 1))
            rows = (jnp.arange(S), repeat)
            if name.startswith(MAX_PREFIX):
                aux_acc[name] = aux_acc[name].at[rows].max(jnp.where(mask, value, -jnp.inf))
            else:
                aux_acc[name] = aux_acc[name].at[rows].add(jnp.where(mask, value, 0.0))
        leaving = microbatch[S - 1]
        stream = stream.at[leaving].set(jnp.where(active[S - 1], out[S - 1], stream[leaving]))
        held = jnp.roll(out, 1, axis=0)  # stage s's output becomes stage s + 1's input
        return (held, stream, aux_acc), None

    (_, stream, aux_acc), _ = jax.lax.scan(iteration, (held, stream, aux_acc), jnp.arange(plan.iterations))
    aux = {name: _canonical_aux(acc if name.startswith(MAX_PREFIX) else acc / M, plan)
           for name, acc in aux_acc.items()}
    return constrain(merge_microbatches(stream), ("act_batch", "act_length", "act_embed")), aux
