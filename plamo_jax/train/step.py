"""The train and eval steps as pure functions of (state, batch), jitted once with explicit shardings.

State is a dict pytree {"step", "params", "opt_state", "rng"} with params as a pure nested dict, so
the same tree goes to Orbax, to the Hugging Face converters and to `jax.jit` unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from plamo_jax.train.losses import cross_entropy_sums

Batch = dict[str, jax.Array]
BATCH_KEYS = ("input_ids", "target_ids", "segment_ids", "positions", "loss_mask")


def model_loss_sums(
    graphdef: nnx.GraphDef, params: Any, batch: Batch, model_cfg: ml_collections.ConfigDict, z_loss: float
) -> tuple[jax.Array, dict]:
    """(objective sum, metric sums) for one batch; the objective is normalised by the caller."""
    model = nnx.merge(graphdef, params)
    logits, aux = model(batch["input_ids"], batch["segment_ids"], batch["positions"])
    sums = cross_entropy_sums(logits, batch["target_ids"], batch["loss_mask"], z_loss)
    objective = sums["cross_entropy"] + sums["z_loss"]
    # Auxiliary losses (MoE) are per-token means per block: weight by tokens so sums stay additive.
    # Logged unweighted (summed over blocks); the objective adds coefficient x that.
    for name, coefficient in auxiliary_loss_weights(model_cfg).items():
        if name in aux:
            sums[name] = jnp.sum(aux[name]) * sums["tokens"]
            objective = objective + coefficient * sums[name]
    for name, value in aux.items():  # statistics (per block, per expert): token-weighted like the rest
        if name not in sums:
            sums[f"aux/{name}"] = value.astype(jnp.float32) * sums["tokens"]
    return objective, sums


def auxiliary_loss_weights(model_cfg: ml_collections.ConfigDict) -> dict[str, float]:
    if model_cfg.family != "moe":
        return {}
    return {"load_balance_loss": model_cfg.moe_aux_loss, "router_z_loss": model_cfg.router_z_loss}


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    """[B, L] -> [k, B/k, L], taking every k-th row so each microbatch keeps the batch sharding."""

    def split(x):
        rows = x.shape[0]
        return x.reshape(rows // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_sums_fn, params: Any, batch: Batch, num_microbatches: int):
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


def train_step(
    state: dict,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    model_cfg: ml_collections.ConfigDict,
    z_loss: float,
    num_microbatches: int,
):
    """One optimizer step; gradients accumulate over `num_microbatches` inside the step."""
    grads, sums = accumulate_gradients(
        lambda params, mb: model_loss_sums(graphdef, params, mb, model_cfg, z_loss),
        state["params"],
        batch,
        num_microbatches,
    )
    new_state, norms = apply_gradients(state, grads, sums["tokens"], optimizer)
    return new_state, summarize(sums) | norms


def summarize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = {
        "loss": (sums["cross_entropy"] + sums["z_loss"]) / tokens,
        "cross_entropy": sums["cross_entropy"] / tokens,
        "z_loss": sums["z_loss"] / tokens,
        "accuracy": sums["correct"] / tokens,
        "tokens": sums["tokens"],
    }
    for name, value in sums.items():
        if name not in metrics and name not in ("correct",):
            metrics[name] = value / tokens
    return metrics


def make_train_step(graphdef, optimizer, model_cfg, *, z_loss: float, num_microbatches: int):
    return functools.partial(
        train_step,
        graphdef=graphdef,
        optimizer=optimizer,
        model_cfg=model_cfg,
        z_loss=z_loss,
        num_microbatches=num_microbatches,
    )
