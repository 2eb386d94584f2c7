"""The train step as a pure function of (state, batch, frozen), the same for every objective.

State is a dict pytree {"step", "params", "opt_state", "rng", "guard"} with params as a pure nested
dict, so the same tree goes to Orbax, to the Hugging Face converters and to `jax.jit` unchanged. The
objective (train/objectives/) turns a batch into an objective sum and metric sums; everything is a
sum (statistics named `max/...` are maxima), so microbatches accumulate exactly and the gradient is
divided once by the objective's count. The guard (train/guards.py) keeps the old parameters and
optimizer state when a step is not finite or spikes. Health metrics: gradient, parameter and update
norms per parameter group (each scanned block, the embeddings, the head).
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
from plamo_jax.parallel import context
from plamo_jax.train import guards

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


MAX_PREFIX = "max/"  # statistics combined by maximum, not summed (e.g. the largest attention logit)


def add_statistics(sums: dict, aux: Mapping[str, jax.Array], count: jax.Array) -> None:
    """Per-block statistics (tokens per expert, dropped fraction, ...) as `aux/<name>`, count-weighted;
    those named `max_*` (largest logits) as `max/<name>`, taken as they are."""
    for name, value in aux.items():
        if name in sums:
            continue
        if name.startswith("max_"):
            sums[MAX_PREFIX + name.removeprefix("max_")] = value.astype(jnp.float32)
        else:
            sums[f"aux/{name}"] = value.astype(jnp.float32) * count


def combine_sums(a: dict, b: dict) -> dict:
    """Two microbatches' sums as one batch's: added, except maxima."""
    return {name: jnp.maximum(a[name], b[name]) if name.startswith(MAX_PREFIX) else a[name] + b[name]
            for name in a}


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
        return (jax.tree.map(jnp.add, grads_acc, grads), combine_sums(sums_acc, sums)), None

    microbatches = split_microbatches(batch, num_microbatches)
    first = jax.tree.map(lambda x: x[0], microbatches)
    shapes = jax.eval_shape(grad_fn, params, first)[1]
    zero_sums = {name: jnp.full(shape.shape, -jnp.inf if name.startswith(MAX_PREFIX) else 0, shape.dtype)
                 for name, shape in shapes.items()}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), microbatches)
    return grads, sums


def group_squares(tree: Any) -> dict[str, jax.Array]:
    """Sum of squares per parameter group: per scanned block (a vector over the leading layers axis) for
    `blocks`, one number for every other top-level entry (embed, lm_head, final_norm)."""
    squares = {}
    for group, subtree in tree.items():
        leaves = [leaf.astype(jnp.float32) for leaf in jax.tree.leaves(subtree)]
        per_layer = group == "blocks"
        squares[group] = sum(jnp.sum(jnp.square(leaf), axis=tuple(range(1 if per_layer else 0, leaf.ndim)))
                             for leaf in leaves)
    return squares


def apply_gradients(
    state: dict, grad_sums: Any, count: jax.Array, optimizer: optax.GradientTransformation
) -> tuple[dict, dict]:
    """(new state, norms) after one optimizer update with the gradient sums divided by `count`.

    Each of the gradients, the new parameters and the update is read once for its norms: the global
    gradient and parameter norms (the guard's) are the square root of the groups' sums, which on a
    2-core CPU saves ~1% of the Llama-shape step over separate global and per-group norms.
    """
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grad_sums)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_squares, param_squares, update_squares = (group_squares(t) for t in (grads, params, updates))
    total = lambda squares: jnp.sqrt(sum(jnp.sum(value) for value in squares.values()))
    norms = {"grad_norm": total(grad_squares), "param_norm": total(param_squares)}
    for group in grad_squares:
        param_norm = jnp.sqrt(param_squares[group])
        norms[f"health/grad_norm/{group}"] = jnp.sqrt(grad_squares[group])
        norms[f"health/param_norm/{group}"] = param_norm
        update_norm = jnp.sqrt(update_squares[group])
        norms[f"health/update_ratio/{group}"] = update_norm / jnp.maximum(param_norm, 1e-30)
    return dict(state, step=state["step"] + 1, params=params, opt_state=opt_state), norms


def guarded(old: dict, new: dict, reason: jax.Array, guard: dict) -> dict:
    """`new` when the step is healthy, else `old` with only the step counter advanced; the new guard."""
    healthy = reason == guards.HEALTHY
    kept = jax.tree.map(lambda n, o: jnp.where(healthy, n, o), (new["params"], new["opt_state"]),
                        (old["params"], old["opt_state"]))
    return dict(new, params=kept[0], opt_state=kept[1], guard=guard)


def train_step(state: dict, batch: Batch, frozen: Any, *, objective, config: ml_collections.ConfigDict,
               graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
    """One optimizer step of `objective`; gradients accumulate over train.microbatches inside the step.

    frozen: the objective's frozen parameters (DPO's reference), or None.
    """

    def loss_sums(params, microbatch):
        return objective.loss_sums(graphdef, params, frozen, microbatch, config)

    shards = context.sequence_shards()
    balanced = context.load_balanced(config.model, shards)
    if balanced:  # the one place a batch is laid out for causal balance across sequence shards
        batch = context.lay_out_batch(batch, shards)
    with context.balanced_layout(balanced):
        grads, sums = accumulate_gradients(loss_sums, state["params"], batch, config.train.microbatches)
    new_state, norms = apply_gradients(state, grads, sums[objective.normalizer], optimizer)
    metrics = objective.metrics(sums) | norms
    reason, guard = guards.assess(state["guard"], metrics["loss"], norms["grad_norm"], norms["param_norm"],
                                  guards.GuardSettings.from_config(config.train))
    return guarded(state, new_state, reason, guard), metrics | guards.guard_metrics(reason, guard)


def make_train_step(objective, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation):
    """(state, batch, frozen) -> (state, metrics), not yet jitted (train/run.py jits it with shardings)."""
    return functools.partial(train_step, objective=objective, config=config, graphdef=graphdef,
                             optimizer=optimizer)
