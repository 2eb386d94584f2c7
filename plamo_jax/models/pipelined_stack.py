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

Rematerialisation (`iteration_policy`): with model.remat the backward pass keeps each block's input and
recomputes the block, as without a pipeline. With model.pipeline_remat_iterations it keeps only each
iteration's stage input (R * M + S - 1 microbatch activations per device) and recomputes the stage's K
blocks, for one more forward pass of each stage.

Data copies (parallel/pipeline.py `data_copies`): for families whose blocks treat rows independently,
each shard of the `data` axis runs its rows with its own copy of the stage weights, so weight gradients
are reduced over `data` once per step instead of once per iteration.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from plamo_jax.parallel import rules as sharding_rules
from plamo_jax.parallel.pipeline import DATA_AXIS, STAGE_AXIS, PipelinePlan, data_copies
from plamo_jax.parallel.rules import constrain

RunBlocks = Callable[[nnx.Module, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]
MAX_PREFIX = "max_"  # per-block statistics combined by maximum over microbatches (others are averaged)
WEIGHT_CHUNK = "pipeline_weight_chunk"  # checkpoint names, see `iteration_policy`
BLOCK_INPUT = "pipeline_block_input"

STAGE_ACTIVATION = ("act_stage", "act_batch", "act_length", "act_embed")
STAGE_IDS = ("act_stage", "act_batch", "act_length")
STREAM = (None, "act_batch", "act_length", "act_embed")
MICROBATCH = ("act_batch", "act_length", "act_embed")


def split_microbatches(x: jax.Array, count: int) -> jax.Array:
    """[B, ...] -> [count, B / count, ...], every count-th row (each microbatch keeps the batch sharding;
    the same split as gradient accumulation in train/step.py)."""
    return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _without_data(rules: sharding_rules.Rules) -> dict:
    """The rules inside one data copy: its rows are already that shard's, nothing else splits over data."""
    return {name: tuple(a for a in axes if a != DATA_AXIS) if name.startswith("act_") and axes else axes
            for name, axes in rules.items()}


def _per_data_copy(stage, copies: int):
    """`stage` on each data shard's rows with that shard's copy of the weights
    (parallel/pipeline.py `data_copies`: the gradient reduction over `data` leaves the loop)."""
    mesh, rules = sharding_rules.active_mesh_and_rules()
    inner_rules = _without_data(rules)

    def one_copy(params, repeat, x, segment_ids, positions, indices):
        with sharding_rules.sharding_context(mesh, inner_rules):
            return stage(params, repeat, x, segment_ids, positions, indices)

    per_copy = jax.vmap(one_copy, in_axes=(0, None, 0, 0, 0, None), spmd_axis_name=DATA_AXIS)

    def run(params, repeat, x, segment_ids, positions, indices):
        split = lambda a: a.reshape(copies, a.shape[0] // copies, *a.shape[1:])
        out, aux = per_copy(params, repeat, split(x), split(segment_ids), split(positions), indices)
        aux = {name: jnp.max(value, axis=0) if name.startswith(MAX_PREFIX) else jnp.mean(value, axis=0)
               for name, value in aux.items()}
        return out.reshape(copies * out.shape[1], *out.shape[2:]), aux

    return run


def iteration_policy(remat: str, remat_iterations: bool):
    """What the backward pass keeps of one iteration (one stage's blocks on one microbatch).

    Never the iteration's weight chunk (a slice that depends on the iteration, which would be kept once
    per iteration): it is sliced again. Without remat everything else; with remat each block's input
    (the decoder names it BLOCK_INPUT), each block then recomputed from it. save_dots keeps no more than
    full here: under the vmap over stages every matmul has a batch dimension, which that policy does not
    save. With remat_iterations only the stage's inputs.
    """
    policies = jax.checkpoint_policies
    if remat_iterations:
        return policies.nothing_saveable
    if remat == "none":
        return policies.save_anything_except_these_names(WEIGHT_CHUNK)
    return policies.save_only_these_names(BLOCK_INPUT)


def _stage_major(state: nnx.State, plan: PipelinePlan, copies: int) -> nnx.State:
    """Block parameters [num_blocks, ...] -> [S, R, K, ...], S sharded over `stage`; with data copies
    [S, copies, R, K, ...], the copies sharded over `data`."""
    order = plan.stage_major_order()

    def one(variable: nnx.Variable) -> nnx.Variable:
        value = variable[...]
        if plan.repeats > 1:
            value = jnp.take(value, order, axis=0)
        value = value.reshape(plan.stages, plan.repeats, plan.blocks_per_chunk, *value.shape[1:])
        axes = tuple(variable.get_metadata().get("out_sharding") or (None,) * (value.ndim - 2))
        if copies == 1:
            return variable.replace(constrain(value, ("layers", None, None, *axes[1:])))
        value = jnp.broadcast_to(value[:, None], (value.shape[0], copies, *value.shape[1:]))
        # the copies' dimension, as long as `data`, takes `data` from act_batch (the rest do not divide it)
        return variable.replace(constrain(value, ("layers", "act_batch", None, None, *axes[1:])))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _canonical_aux(acc: jax.Array, plan: PipelinePlan) -> jax.Array:
    """[S, R, K, ...] per-block values -> [num_blocks, ...] in canonical order ((r * S + s) * K + k)."""
    return acc.swapaxes(0, 1).reshape(plan.num_blocks, *acc.shape[3:])


def pipelined_stack(blocks: nnx.Module, run_blocks: RunBlocks, x_BLD: jax.Array, segment_ids_BL: jax.Array,
                    positions_BL: jax.Array, plan: PipelinePlan, remat: str, remat_iterations: bool,
                    rows_independent: bool = True) -> tuple[jax.Array, dict]:
    """(x after every block, per-block aux [num_blocks, ...]) like the plain scan over `blocks`.

    `run_blocks(blocks, x, segment_ids, positions, block_indices)` runs a stack of blocks (the decoder's
    scan). Aux values are per-microbatch block statistics: averaged over the M microbatches (the MoE
    auxiliary losses of gradient accumulation over the same microbatches), `max_*` maximised.
    remat: model.remat; remat_iterations: keep only each iteration's stage inputs (`iteration_policy`).
    rows_independent: the family's blocks treat batch rows independently (`data_copies`).
    """
    S, R, M = plan.stages, plan.repeats, plan.microbatches
    graphdef, state = nnx.split(blocks)
    current = sharding_rules.active_mesh_and_rules()
    copies = 1 if current is None else data_copies(current[0].shape, current[1], rows_independent,
                                                   x_BLD.shape[0] // M)
    stage_state = _stage_major(state, plan, copies)
    block_indices = jnp.asarray(plan.stage_major_order().reshape(S, R, plan.blocks_per_chunk), jnp.int32)

    def stage(stage_params, repeat, x, segment_ids, positions, indices):
        if R == 1:  # a static slice of loop-invariant weights: JAX keeps it once, not per iteration
            repeat = 0
        chunk = jax.tree.map(lambda leaf: checkpoint_name(leaf[repeat], WEIGHT_CHUNK), stage_params)
        return run_blocks(nnx.merge(graphdef, chunk), x, segment_ids, positions, indices[repeat])

    stage = jax.checkpoint(stage, policy=iteration_policy(remat, remat_iterations))
    if copies > 1:
        stage = _per_data_copy(stage, copies)
    stages = jax.vmap(stage, spmd_axis_name=STAGE_AXIS)

    stream = constrain(split_microbatches(x_BLD, M), STREAM)  # [M, B/M, L, D]
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
        # the first and last stages' microbatches as scalars of t alone: indexing the per-stage vector
        # instead lets the partitioner shard it over `stage` and gather the stream to slice it (TPU)
        entering, leaving = t % M, (t - (S - 1)) % M
        held = constrain(held.at[0].set(constrain(stream[entering], MICROBATCH)), STAGE_ACTIVATION)
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
        # every piece constrained: left to itself, the TPU partitioner gathers the stream over the batch
        # axes to slice it
        finished = constrain(out[S - 1], MICROBATCH)
        kept = constrain(stream[leaving], MICROBATCH)
        stream = constrain(stream.at[leaving].set(jnp.where(active[S - 1], finished, kept)), STREAM)
        held = jnp.roll(out, 1, axis=0)  # stage s's output becomes stage s + 1's input
        return (held, stream, aux_acc), None

    (_, stream, aux_acc), _ = jax.lax.scan(iteration, (held, stream, aux_acc), jnp.arange(plan.iterations))
    aux = {name: _canonical_aux(acc if name.startswith(MAX_PREFIX) else acc / M, plan)
           for name, acc in aux_acc.items()}
    return constrain(merge_microbatches(stream), MICROBATCH), aux
