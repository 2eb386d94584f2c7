"""Model and train state built directly in their shardings (never whole on one device)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from plamo_jax.models.decoder import Decoder
from plamo_jax.parallel import rules as rules_lib
from plamo_jax.train import guards

# the train.spike_* defaults
DEFAULT_GUARD = guards.GuardSettings(spike_sigma=6.0, window=128, warmup=20, patience=4)

BATCH_LOGICAL_AXES = ("act_batch", "act_length")


@dataclasses.dataclass
class ModelSetup:
    graphdef: nnx.GraphDef
    abstract_params: Any  # pure dict of jax.ShapeDtypeStruct
    logical_axes: Any  # pure dict of logical-axis tuples, same structure
    param_shardings: Any
    mesh: Mesh
    rules: rules_lib.Rules


def parameter_count(abstract_params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(abstract_params))


def abstract_model(model_cfg: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract params, logical axes) without allocating any parameter."""
    model = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    abstract_params = nnx.to_pure_dict(state)
    logical = {}
    for path, variable in nnx.to_flat_state(state):
        node = logical
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(variable.get_metadata().get("out_sharding") or (None,) * variable.ndim)
    return graphdef, abstract_params, logical


def setup_model(model_cfg: ml_collections.ConfigDict, mesh: Mesh, rules: rules_lib.Rules) -> ModelSetup:
    graphdef, abstract_params, logical = abstract_model(model_cfg)
    shardings = rules_lib.tree_shardings(abstract_params, logical, rules, mesh)
    return ModelSetup(graphdef, abstract_params, logical, shardings, mesh, rules)


def init_params(model_cfg: ml_collections.ConfigDict, setup: ModelSetup, seed: int) -> Any:
    """Parameters initialised inside one jit whose outputs are already sharded."""

    def create():
        return nnx.to_pure_dict(nnx.state(Decoder(model_cfg, rngs=nnx.Rngs(seed))))

    with rules_lib.sharding_context(setup.mesh, setup.rules):
        return jax.jit(create, out_shardings=setup.param_shardings)()


def abstract_guard(guard: guards.GuardSettings) -> dict:
    return jax.eval_shape(lambda: guards.initial_state(guard))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(setup: ModelSetup, optimizer: optax.GradientTransformation,
                    guard: guards.GuardSettings = DEFAULT_GUARD) -> dict:
    """Shardings of {"step", "params", "opt_state", "rng", "guard"}: optimizer moments follow their
    parameters; the rest is replicated."""
    abstract_opt = jax.eval_shape(optimizer.init, setup.abstract_params)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt,
        setup.param_shardings,
        transform_non_params=lambda _: replicated(setup.mesh),
    )
    return {
        "step": replicated(setup.mesh),
        "params": setup.param_shardings,
        "opt_state": opt_shardings,
        "rng": replicated(setup.mesh),
        "guard": jax.tree.map(lambda _: replicated(setup.mesh), abstract_guard(guard)),
    }


def abstract_state(setup: ModelSetup, optimizer: optax.GradientTransformation,
                   guard: guards.GuardSettings = DEFAULT_GUARD) -> dict:
    """ShapeDtypeStructs carrying shardings: the target for restoring a checkpoint onto this mesh."""
    shardings = state_shardings(setup, optimizer, guard)
    shapes = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": setup.abstract_params,
        "opt_state": jax.eval_shape(optimizer.init, setup.abstract_params),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        "guard": abstract_guard(guard),
    }
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(
    model_cfg, setup: ModelSetup, optimizer: optax.GradientTransformation, seed: int, params: Any = None,
    guard: guards.GuardSettings = DEFAULT_GUARD,
) -> dict:
    """Step 0 state; `params` (already in setup.param_shardings) replaces the random initialisation."""
    if params is None:
        params = init_params(model_cfg, setup, seed)
    shardings = state_shardings(setup, optimizer, guard)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32), shardings["rng"])
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    guard_state = jax.device_put(guards.initial_state(guard), shardings["guard"])
    return {"step": step, "params": params, "opt_state": opt_state, "rng": rng, "guard": guard_state}


def batch_sharding(mesh: Mesh, rules: rules_lib.Rules) -> NamedSharding:
    return NamedSharding(mesh, rules_lib.logical_to_spec(BATCH_LOGICAL_AXES, rules, mesh))


def rows_per_process(sharding: NamedSharding, global_batch_size: int, seq_len: int) -> int:
    """How many distinct batch rows this process's devices hold under `sharding`."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size, seq_len)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    return len(rows)


def data_shard_of_process(sharding: NamedSharding, global_batch_size: int, seq_len: int) -> tuple[int, int]:
    """(index, count) of the data shard this process reads: processes whose devices hold the same rows
    (pipeline stages, or tensor axes, across hosts) read the same shard; shards go by their first row."""
    rows_of: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((global_batch_size, seq_len)).items():
        rows_of.setdefault(device.process_index, set()).update(range(*index[0].indices(global_batch_size)))
    groups = sorted({min(rows) for rows in rows_of.values()})
    return groups.index(min(rows_of[jax.process_index()])), len(groups)


def global_batch(local_batch: dict, sharding: NamedSharding, global_batch_size: int) -> dict:
    """Host-local rows -> global jax.Arrays laid out for the mesh (each host passes only its rows)."""

    def one(x):
        global_shape = (global_batch_size, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return {name: one(value) for name, value in local_batch.items()}
