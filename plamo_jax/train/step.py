"""The train step as a pure function of (state, batch, frozen), the same for every objective.

State is a dict pytree {"step", "params", "opt_state", "rng"} with params as a pure nested dict, so
the same tree goes to Orbax, to the Hugging Face converters and to `jax.jit` unchanged. The
objective (train/objectives/) turns a batch into an objective sum and metric sums; everything is a
sum, so microbatches accumulate exactly and the gradient is divided once by the objective's count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from plamo_jax.models import registry

Batch = dict[str, jax.Array]
LossSums = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def forward(graphdef: nnx.GraphDef, params: Any, fields: Batch) -> tuple[jax.Array, dict]:
    """(fp32 logits [B, L, V], per-block aux) of the model on one sequence's fields."""
    model = nnx.merge(graphdef, params)
    return model(fields["input_ids"], fields["segment_ids"], fields["positions"])


def add_auxiliary_losses(objective: jax.Array, sums: dict, aux: Mapping[str, jax.Array],
                         model_cfg: ml_collections.ConfigDict, count: jax.Array) -> jax.Array:
    """Add the family's auxiliary losses (e.g. MoE load balance) to `objective`; log them in `sums`.

    Auxiliary losses are per-block means: each is summed over blocks and weighted by `count` (tokens or
    pairs) so that sums stay additive over microbatches; the objective adds coefficient x that.
    """
    for name, coefficient in registry.get_family(model_cfg).auxiliary_losses(model_cfg).items():
        if name in aux:
            sums[name] = jnp.sum(aux[name]) * count
            objective = objective + coefficient * sums[name]
    return objective


def add_statistics(sums: dict, aux: Mapping[str, jax.Array], count: jax.Array) -> None:
    """Per-block statistics (tokens per expert, dropped fraction, ...) as `aux/<name>`, count-weighted."""
    for name, value in aux.items():
        if name not in sums:
            sums[f"aux/{name}"] = value.astype(jnp.float32) * count


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    """[B, L] -> [k, B/k, L], taking every k-th row so each microbatch keeps the batch sharding."""

    def split(x):
        rows = x.shape[0]
        return x.reshape(rows // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_sums_fn: LossSums, params: Any, batch: Batch, num_microbatches: int):
    """(gradient sums, metric sums) of `loss_sums_fn(params, batch) -> (objective sum, sums)`.

    Everything is a sum, so accumulating over microbatches equals one pass over the whole batch.
    """
    grad_fn = jax.grad(loss_sums_fn, has_aux=True)
    if num_microbatches == 1:
        return grad_fn(params, batch)

    def accumulate(carry, microbatch):
        grads_acc, sums_acc = carry
        grads, sums = grad_fn(params, microbatch)
        return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

    microbatches = split_microbatches(batch, num_microbatches)
    first = jax.tree.map(lambda x: x[0], microbatches)
    zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first)[1])
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), microbatches)
    return grads, sums


def apply_gradients(
    state: dict, grad_sums: Any, count: jax.Array, optimizer: optax.GradientTransformation
) -> tuple[dict, dict]:
    """(new state, norms) after one optimizer update with the gradient sums divided by `count`."""
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grad_sums)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    norms = {"grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    return dict(state, step=state["step"] + 1, params=params, opt_state=opt_state), norms


def train_step(state: dict, batch: Batch, frozen: Any, *, objective, config: ml_collections.ConfigDict,
               graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
    """One optimizer step of `objective`; gradients accumulate over train.microbatches inside the step.

    frozen: the objective's frozen parameters (DPO's reference), or None.
    """

    def loss_sums(params, microbatch):
        return objective.loss_sums(graphdef, params, frozen, microbatch, config)

    grads, sums = accumulate_gradients(loss_sums, state["params"], batch, config.train.microbatches)
    new_state, norms = apply_gradients(state, grads, sums[objective.normalizer], optimizer)
    return new_state, objective.metrics(sums) | norms


def make_train_step(objective, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation):
    """(state, batch, frozen) -> (state, metrics), not yet jitted (train/run.py jits it with shardings)."""
    return functools.partial(train_step, objective=objective, config=config, graphdef=graphdef,
                             optimizer=optimizer)
