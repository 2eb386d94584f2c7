"""MoE expert computation: grouped matmuls over assignments sorted by expert, and expert parallelism.

The expert computation runs inside `jax.shard_map` whenever a mesh is active: each shard takes its
own tokens, sends every (token, expert) assignment to the shard holding that expert with an
all-to-all over the mesh axes of the `expert` logical axis, runs its experts as grouped matmuls on
assignments sorted by expert and sends the results back; mlp-sharded (tensor) experts give partial
sums, reduced with psum. Without a mesh the same grouped computation runs on all tokens at once.

Grouped matmuls: megablox `gmm` (the Pallas TPU kernel JAX ships) on TPU, `jax.lax.ragged_dot` on GPU;
on CPU, where JAX lowers ragged_dot to a dense masked product over every expert, a blocked equivalent
(`blocked_swiglu`). `models.kernels` decides.

All-to-all buffers have static shapes: dropless mode reserves room for all of a shard's assignments
per destination ([expert shards, tokens * k, d_model]); capacity mode bounds a destination's share by
capacity * local experts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import megablox
from jax.sharding import PartitionSpec

from plamo_jax.errors import ShardingError
from plamo_jax.models import kernels
from plamo_jax.parallel import rules as sharding_rules


def ragged_swiglu(x_AD: jax.Array, group_sizes_E: jax.Array, gate_EDF: jax.Array, up_EDF: jax.Array,
                  down_EFD: jax.Array) -> jax.Array:
    """SwiGLU of rows sorted by expert (group_sizes_E rows each; later rows unused) with ragged matmuls.

    GPUs lower `ragged_dot` to grouped-matmul kernels; XLA:CPU has none (JAX computes every expert on
    every row and masks), hence `blocked_swiglu` there; TPUs take `megablox_swiglu`.
    """
    gate = jax.lax.ragged_dot(x_AD, gate_EDF, group_sizes_E)
    up = jax.lax.ragged_dot(x_AD, up_EDF, group_sizes_E)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, down_EFD, group_sizes_E)


def blocked_swiglu(x_AD: jax.Array, group_sizes_E: jax.Array, gate_EDF: jax.Array, up_EDF: jax.Array,
                   down_EFD: jax.Array) -> jax.Array:
    """The same result as `ragged_swiglu` with static shapes and ~1.25x the expert FLOPs instead of E x.

    Each expert's rows are padded to whole blocks of `block` rows; every block belongs to one expert and
    is one slice of a batched matmul against that expert's gathered weights.
    """
    rows, num_experts = x_AD.shape[0], gate_EDF.shape[0]
    block = max(8, -(-rows // (4 * num_experts)))  # padding adds at most a quarter of the rows
    num_blocks = -(-rows // block) + num_experts
    blocks_E = -(-group_sizes_E // block)
    block_starts_E = jnp.cumsum(blocks_E) - blocks_E
    row_starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    row = jnp.arange(rows)
    expert_A = jnp.searchsorted(jnp.cumsum(group_sizes_E), row, side="right")  # num_experts: unused row
    expert_A = jnp.minimum(expert_A, num_experts - 1)
    used_A = row < jnp.sum(group_sizes_E)
    padded_A = jnp.where(used_A, block_starts_E[expert_A] * block + row - row_starts_E[expert_A],
                         num_blocks * block)
    x_blocks = jnp.zeros((num_blocks * block, x_AD.shape[1]), x_AD.dtype).at[padded_A].set(x_AD, mode="drop")
    x_blocks = x_blocks.reshape(num_blocks, block, -1)
    expert_of_block = jnp.searchsorted(jnp.cumsum(blocks_E), jnp.arange(num_blocks), side="right")
    expert_of_block = jnp.minimum(expert_of_block, num_experts - 1)  # trailing empty blocks: any expert
    gate = jnp.einsum("nbd,ndf->nbf", x_blocks, gate_EDF[expert_of_block])
    up = jnp.einsum("nbd,ndf->nbf", x_blocks, up_EDF[expert_of_block])
    out = jnp.einsum("nbf,nfd->nbd", jax.nn.silu(gate) * up, down_EFD[expert_of_block])
    out = out.reshape(num_blocks * block, -1).at[padded_A].get(mode="fill", fill_value=0)
    return jnp.where(used_A[:, None], out, 0)


MEGABLOX_TILE = 128  # megablox's (rows, contraction, output) tile: the TPU's 128 lanes


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def megablox_swiglu(x_AD: jax.Array, group_sizes_E: jax.Array, gate_EDF: jax.Array, up_EDF: jax.Array,
                    down_EFD: jax.Array) -> jax.Array:
    """`ragged_swiglu` with megablox's grouped matmul (its backward: gmm for the input gradient, tgmm for
    the weights'). Rows, d_model and the expert width are padded with zeros to whole 128-tiles: the
    backward runs the products transposed with the same tiles, so every dimension must take them
    (real shapes pad nothing; zero columns add nothing: silu(0) * 0 = 0). Padded and unused rows belong
    to no group and come out zero."""
    rows, d_model = x_AD.shape
    pad = lambda a, *axes: functools.reduce(lambda t, axis: _pad_axis(t, axis, MEGABLOX_TILE), axes, a)
    x = pad(x_AD, 0, 1)
    gate, up, down = pad(gate_EDF, 1, 2), pad(up_EDF, 1, 2), pad(down_EFD, 1, 2)
    # gmm leaves the output rows of no group unwritten (whatever the buffer held): zeroed after every
    # product, so nothing of them reaches a value or, through the backward pass, a gradient
    in_groups = (jnp.arange(x.shape[0]) < jnp.sum(group_sizes_E))[:, None]
    tiling = (MEGABLOX_TILE,) * 3
    interpret = kernels.interpret_pallas()

    def gmm(lhs, rhs):
        out = megablox.gmm(lhs, rhs, group_sizes_E, lhs.dtype, tiling, interpret=interpret)
        return jnp.where(in_groups, out, 0)

    x = jnp.where(in_groups, x, 0)
    hidden = jax.nn.silu(gmm(x, gate)) * gmm(x, up)
    return gmm(hidden, down)[:rows, :d_model]


def grouped_swiglu(x_AD, group_sizes_E, gate_EDF, up_EDF, down_EFD) -> jax.Array:
    platform = kernels.target_platform()
    if platform == "cpu":
        return blocked_swiglu(x_AD, group_sizes_E, gate_EDF, up_EDF, down_EFD)
    if platform == "tpu":
        return megablox_swiglu(x_AD, group_sizes_E, gate_EDF, up_EDF, down_EFD)
    return ragged_swiglu(x_AD, group_sizes_E, gate_EDF, up_EDF, down_EFD)


def grouped_experts(x_RD: jax.Array, row_A: jax.Array, expert_A: jax.Array, gate_EDF: jax.Array,
                    up_EDF: jax.Array, down_EFD: jax.Array) -> jax.Array:
    """out[a] = expert_{expert_A[a]}(x_RD[row_A[a]]); assignments whose expert id is outside [0, E)
    give zeros.

    Assignments are sorted by expert (invalid ids last) so each expert is one contiguous group of the
    grouped matmul, then put back in their original order.
    """
    num_experts = gate_EDF.shape[0]
    valid_A = (expert_A >= 0) & (expert_A < num_experts)
    sort_key_A = jnp.where(valid_A, expert_A, num_experts)
    order_A = jnp.argsort(sort_key_A, stable=True)
    group_sizes_E = jnp.bincount(sort_key_A, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    out_sorted_AD = grouped_swiglu(x_RD[row_A[order_A]], group_sizes_E, gate_EDF, up_EDF, down_EFD)
    out_AD = jnp.zeros_like(out_sorted_AD).at[order_A].set(out_sorted_AD, unique_indices=True)
    return jnp.where(valid_A[:, None], out_AD, 0)


def combine(out_AD: jax.Array, weights_TK: jax.Array, keep_TK: jax.Array) -> jax.Array:
    """sum_k w_k * out[t * K + k] over the kept assignments."""
    num_tokens, num_selected = weights_TK.shape
    out_TKD = out_AD.reshape(num_tokens, num_selected, -1)
    weights_TK = jnp.where(keep_TK, weights_TK, 0).astype(out_TKD.dtype)
    return jnp.einsum("tkd,tk->td", out_TKD, weights_TK)


def local_moe(x_TD: jax.Array, experts_TK: jax.Array, weights_TK: jax.Array, keep_TK: jax.Array,
              gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array) -> jax.Array:
    """Dropless (or capacity-masked) MoE on tokens whose experts are all local: sum_k w_k * expert_k(x)."""
    num_selected = experts_TK.shape[1]
    expert_A = jnp.where(keep_TK, experts_TK, -1).reshape(-1)  # assignment a = t * K + k
    token_A = jnp.arange(expert_A.shape[0]) // num_selected
    out_AD = grouped_experts(x_TD, token_A, expert_A, gate_EDF, up_EDF, down_EFD)
    return combine(out_AD, weights_TK, keep_TK)


def expert_parallel_moe(x_TD: jax.Array, experts_TK: jax.Array, weights_TK: jax.Array, keep_TK: jax.Array,
                        gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array, *,
                        expert_axes: tuple[str, ...], num_shards: int, slots_per_shard: int) -> jax.Array:
    """Per-shard body inside shard_map: tokens go to the shards holding their experts and come back.

    gate/up/down hold this shard's E_local experts (shard s holds experts s*E_local ...). Each source
    shard sends a fixed [num_shards, slots_per_shard, D] buffer (static shapes for the all-to-all);
    slots_per_shard bounds how many assignments one shard can send to one other shard.
    """
    num_selected = experts_TK.shape[1]
    experts_local = gate_EDF.shape[0]
    expert_A = experts_TK.reshape(-1)
    keep_A = keep_TK.reshape(-1)
    destination_A = jnp.where(keep_A, expert_A // experts_local, num_shards)
    order_A = jnp.argsort(destination_A, stable=True)
    destination_sorted_A = destination_A[order_A]
    counts_S = jnp.bincount(destination_A, length=num_shards + 1)[:num_shards]
    starts_S = jnp.cumsum(counts_S) - counts_S
    slot_sorted_A = jnp.arange(order_A.shape[0]) - starts_S[jnp.minimum(destination_sorted_A, num_shards - 1)]
    token_sorted_A = order_A // num_selected

    # Dropped assignments have destination == num_shards: out of bounds, so the scatter skips them.
    send_x = jnp.zeros((num_shards, slots_per_shard, x_TD.shape[-1]), x_TD.dtype)
    send_x = send_x.at[destination_sorted_A, slot_sorted_A].set(x_TD[token_sorted_A], mode="drop")
    send_expert = jnp.full((num_shards, slots_per_shard), -1, jnp.int32)
    send_expert = send_expert.at[destination_sorted_A, slot_sorted_A].set(
        expert_A[order_A] % experts_local, mode="drop")

    recv_x = jax.lax.all_to_all(send_x, expert_axes, 0, 0, tiled=True)
    recv_expert = jax.lax.all_to_all(send_expert, expert_axes, 0, 0, tiled=True)
    recv_expert = recv_expert.reshape(-1)
    out = grouped_experts(recv_x.reshape(-1, recv_x.shape[-1]), jnp.arange(recv_expert.shape[0]), recv_expert,
                          gate_EDF, up_EDF, down_EFD)
    back = jax.lax.all_to_all(out.reshape(send_x.shape), expert_axes, 0, 0, tiled=True)

    out_sorted_AD = back.at[destination_sorted_A, slot_sorted_A].get(mode="fill", fill_value=0)
    out_AD = jnp.zeros_like(out_sorted_AD).at[order_A].set(out_sorted_AD, unique_indices=True)
    return combine(out_AD, weights_TK, keep_TK)


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _active_mesh_and_rules():
    current = sharding_rules.active_mesh_and_rules()
    if current is None:
        raise RuntimeError("sharded_moe needs an active rules.sharding_context")  # a bug, not an input
    return current


def sharded_moe(x_BLD, experts_BLK, weights_BLK, keep_BLK, gate_EDF, up_EDF, down_EFD, *,
                capacity: int | None) -> jax.Array:
    """Run the experts under the active mesh with shard_map (all-to-all when experts are sharded)."""
    mesh, rules = _active_mesh_and_rules()
    token_spec = sharding_rules.logical_to_spec(("act_batch", "act_length", None), rules, mesh,
                                                x_BLD.shape, "moe tokens")
    up_spec = sharding_rules.logical_to_spec(("expert", None, "mlp"), rules, mesh, gate_EDF.shape,
                                             "moe expert weights")
    expert_axes = _spec_axes(up_spec[0])
    mlp_axes = _spec_axes(up_spec[2])
    down_spec = PartitionSpec(up_spec[0], up_spec[2], None)
    token_axes = _spec_axes(token_spec[0]) + _spec_axes(token_spec[1])
    if not set(expert_axes) <= set(token_axes):
        raise ShardingError(
            f"mesh.rules: expert weights are sharded over {expert_axes}, so tokens must be too, but "
            f"act_batch/act_length shard them over {token_axes}; add the expert axis to mesh.rules.act_batch"
        )
    if set(mlp_axes) & set(token_axes):
        raise ShardingError(f"mesh.rules: mlp axes {mlp_axes} of the experts also shard the tokens "
                            f"{token_axes}; expected disjoint axes")
    num_shards = math.prod(mesh.shape[a] for a in expert_axes)
    batch, length, num_selected = experts_BLK.shape
    tokens_per_shard = batch * length // math.prod(mesh.shape[a] for a in token_axes)
    experts_local = gate_EDF.shape[0] // num_shards
    slots = tokens_per_shard * num_selected  # dropless: everything could go to one shard
    if capacity is not None:
        slots = min(slots, capacity * experts_local)

    def body(x, experts, weights, keep, gate, up, down):
        local_batch, local_length, d_model = x.shape
        flat = lambda a: a.reshape(local_batch * local_length, *a.shape[2:])
        if num_shards == 1:
            out = local_moe(flat(x), flat(experts), flat(weights), flat(keep), gate, up, down)
        else:
            out = expert_parallel_moe(flat(x), flat(experts), flat(weights), flat(keep), gate, up, down,
                                      expert_axes=expert_axes, num_shards=num_shards, slots_per_shard=slots)
        if mlp_axes:  # each tensor shard computed a slice of the hidden units: partial sums
            out = jax.lax.psum(out, mlp_axes)
        return out.reshape(local_batch, local_length, d_model)

    # check_vma=False: under the pipeline's vmap over stages (spmd_axis_name="stage") the inputs vary over
    # `stage` and the batching rule adds it to the specs, which the replication check does not see.
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, token_spec, up_spec, up_spec, down_spec),
        out_specs=token_spec, check_vma=False,
    )(x_BLD, experts_BLK, weights_BLK, keep_BLK, gate_EDF, up_EDF, down_EFD)
