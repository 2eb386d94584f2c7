"""One place that turns a config into a run: validation, mesh, rules, model, optimizer, objective, step.

    run = build_run(config)                  # the devices JAX sees
    run = build_run(config, devices)         # e.g. compile-only TPU devices, a subset of CPUs
    run = build_run(config, num_devices=64)  # abstract: no devices, for estimates and planning
    new_state, metrics = run.step(state, batch, frozen)

The trainer, the memory estimator, the evaluator and the converters build through here (`build_model`
when no optimizer or objective is needed) and ask the run's family and objective specs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from plamo_jax.configuration import mesh_rules, mesh_sizes, validate_config
from plamo_jax.data import batch as batch_layout
from plamo_jax.errors import ConfigError
from plamo_jax.models import registry
from plamo_jax.models.family import FamilySpec
from plamo_jax.parallel.mesh import make_abstract_mesh, make_mesh
from plamo_jax.parallel.rules import Rules
from plamo_jax.train import guards
from plamo_jax.train import state as state_lib
from plamo_jax.train.batch_ramp import BatchRamp, make_ramp
from plamo_jax.train.flops import train_flops_per_token
from plamo_jax.train.objectives import Objective, get_objective
from plamo_jax.train.optimizer import make_optimizer
from plamo_jax.train.step import make_train_step


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Every config check that needs no file: schema, the family's keys, the objective's keys."""
    validate_config(config, num_devices)
    get_objective(config.train.objective).validate(config)


@dataclasses.dataclass
class ModelRun:
    """A model laid out on a mesh: enough to load, evaluate or convert parameters."""

    config: ml_collections.ConfigDict
    mesh: Mesh | AbstractMesh
    rules: Rules
    family: FamilySpec
    setup: state_lib.ModelSetup

    @property
    def batch_sharding(self) -> NamedSharding:
        return state_lib.batch_sharding(self.mesh, self.rules)


@dataclasses.dataclass
class Run(ModelRun):
    """A training run: the model plus its objective, optimizer and jitted step."""

    objective: Objective
    optimizer: optax.GradientTransformation
    ramp: BatchRamp | None = None  # a batch-size ramp-up (train.rampup_*), else None

    @property
    def guard(self) -> guards.GuardSettings:
        return guards.GuardSettings.from_config(self.config.train)

    @functools.cached_property
    def state_shardings(self) -> dict:
        return state_lib.state_shardings(self.setup, self.optimizer, self.guard)

    @functools.cached_property
    def step(self):
        """(state, batch, frozen) -> (state, metrics), jitted with the mesh shardings; state is donated."""
        step = make_train_step(self.objective, self.config, self.setup.graphdef, self.optimizer)
        frozen = self.abstract_frozen()
        frozen_shardings = None if frozen is None else jax.tree.map(lambda leaf: leaf.sharding, frozen)
        return jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_sharding, frozen_shardings),
            # metrics replicated: per-block norms follow the blocks' `stage` sharding otherwise, which
            # a host cannot fetch when the stages span hosts
            out_shardings=(self.state_shardings, state_lib.replicated(self.mesh)),
            donate_argnums=0,
        )

    # -- abstract arguments (restore targets, compilation without data) ---------------------------

    def abstract_state(self) -> dict:
        return state_lib.abstract_state(self.setup, self.optimizer, self.guard)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        t = self.config.train
        shape = (t.global_batch_size, t.seq_len)
        return {key: jax.ShapeDtypeStruct(shape, batch_layout.dtype_of(key), sharding=self.batch_sharding)
                for key in self.objective.batch_keys}

    def abstract_frozen(self) -> Any:
        return self.objective.abstract_frozen(self.config, self.setup)

    # -- concrete state ---------------------------------------------------------------------------

    def load_frozen(self) -> Any:
        return self.objective.load_frozen(self.config, self.setup)

    def fresh_guard(self) -> dict:
        """A guard with nothing seen yet, placed like the state's (for checkpoints that predate guards)."""
        return jax.device_put(guards.initial_state(self.guard), self.state_shardings["guard"])

    def fresh_state(self, params: Any = None) -> dict:
        """Step 0: `params` (already in the parameter shardings) or a random initialisation."""
        return state_lib.init_state(self.config.model, self.setup, self.optimizer, self.config.train.seed,
                                    params=params, guard=self.guard)

    # -- accounting -------------------------------------------------------------------------------

    def global_batch_at(self, step: int) -> int:
        """Global batch of the step with 0-based index `step` (train.global_batch_size without a ramp)."""
        return self.ramp.batch_size(step) if self.ramp is not None else self.config.train.global_batch_size

    def tokens_at(self, step: int) -> int:
        return self.global_batch_at(step) * self.config.train.seq_len * self.objective.sequences_per_example

    @property
    def tokens_per_step(self) -> int:
        """Tokens of a step at the full global batch."""
        t = self.config.train
        return t.global_batch_size * t.seq_len * self.objective.sequences_per_example

    @property
    def flops_per_token(self) -> float:
        """Model FLOPs (forward + backward, no rematerialisation) per token of `tokens_per_step`."""
        t = self.config.train
        factor = self.objective.flops_factor_of(self.config)
        return train_flops_per_token(self.config.model, t.seq_len, factor)

    @property
    def data_shard(self) -> tuple[int, int]:
        """(index, count) of this process's share of every batch (processes along `stage` share one)."""
        t = self.config.train
        return state_lib.data_shard_of_process(self.batch_sharding, t.global_batch_size, t.seq_len)

    def check_process_rows(self) -> None:
        """Each process must feed exactly the rows its devices hold (the batch axes span the processes,
        or processes holding the same rows, e.g. pipeline stages on different hosts, read the same share)."""
        t = self.config.train
        _, shards = self.data_shard
        for size in sorted(set(self.ramp.sizes if self.ramp is not None else ()) | {t.global_batch_size}):
            held = state_lib.rows_per_process(self.batch_sharding, size, t.seq_len)
            per_process = size // shards
            if held != per_process or size % shards:
                raise ConfigError(
                    f"config section mesh: each process's devices hold {held} of the {size} batch rows, but "
                    f"each of the {shards} data shards of {jax.process_count()} processes reads "
                    f"{per_process}; "
                    "expected the batch axes (data x fsdp x expert) to split every global batch across the "
                    "processes that do not share a pipeline stage's rows"
                )


def _mesh(config, devices: Sequence | None, num_devices: int | None) -> Mesh | AbstractMesh:
    if num_devices is not None:
        if devices is not None:
            raise ValueError("build_run: pass devices or num_devices, not both")
        return make_abstract_mesh(config.mesh, num_devices)
    return make_mesh(config.mesh, list(devices) if devices is not None else None)


def build_model(config: ml_collections.ConfigDict, devices: Sequence | None = None, *,
                num_devices: int | None = None) -> ModelRun:
    """The model of `config` on a mesh of `devices` (default: all), or an abstract one of `num_devices`.

    Checks the mesh and model keys only: converting or evaluating a checkpoint does not need the
    recipe's training keys to make sense.
    """
    count = num_devices if num_devices is not None else len(devices if devices is not None else jax.devices())
    family = registry.get_family(config.model)
    registry.validate_model(config.model, mesh_sizes(config, count))
    mesh = _mesh(config, devices, num_devices)
    rules = mesh_rules(config)
    return ModelRun(config, mesh, rules, family, state_lib.setup_model(config.model, mesh, rules))


def build_run(config: ml_collections.ConfigDict, devices: Sequence | None = None, *,
              num_devices: int | None = None) -> Run:
    """A validated training run of `config` (see the module docstring for the device choices)."""
    count = num_devices if num_devices is not None else len(devices if devices is not None else jax.devices())
    validate(config, count)
    mesh = _mesh(config, devices, num_devices)
    rules = mesh_rules(config)
    ramp = make_ramp(config.train)
    return Run(config, mesh, rules, registry.get_family(config.model),
               state_lib.setup_model(config.model, mesh, rules), get_objective(config.train.objective),
               make_optimizer(config.optimizer, config.train.steps, ramp), ramp)
