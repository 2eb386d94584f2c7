"""Direct Preference Optimization (Rafailov et al. 2023) as a train step over preference pairs.

loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]),
with log-probabilities summed over the response tokens only; `label_smoothing` e gives the
conservative variant (1 - e) * loss(margin) + e * loss(-margin). The reference is the frozen
starting checkpoint, held sharded like the parameters and passed to the step (not checkpointed:
a resumed run reloads it from checkpoint.init_params). Chosen and rejected sequences go through
one forward pass as a batch of 2B rows.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from plamo_jax.posttrain.preference_data import FIELDS, SIDES
from plamo_jax.train import state as state_lib
from plamo_jax.train.step import Batch, accumulate_gradients, apply_gradients, auxiliary_loss_weights


def response_log_probs(
    graphdef: nnx.GraphDef, params: Any, fields: Batch
) -> tuple[jax.Array, jax.Array, dict]:
    """(sum of log p(target) over loss-masked positions per row [rows], masked tokens per row, aux)."""
    model = nnx.merge(graphdef, params)
    logits, aux = model(fields["input_ids"], fields["segment_ids"], fields["positions"])
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, fields["target_ids"][..., None], axis=-1)[..., 0]
    log_probs = target_logit - jax.nn.logsumexp(logits, axis=-1)
    mask = fields["loss_mask"].astype(jnp.float32)
    return jnp.sum(log_probs * mask, axis=-1), jnp.sum(mask, axis=-1), aux


def both_sides(batch: Batch) -> Batch:
    """[B, L] chosen_* and rejected_* fields -> [2B, L] fields, chosen rows first."""
    return {field: jnp.concatenate([batch[f"{side}_{field}"] for side in SIDES]) for field in FIELDS}


def dpo_loss_sums(
    graphdef: nnx.GraphDef,
    params: Any,
    reference_params: Any,
    batch: Batch,
    model_cfg: ml_collections.ConfigDict,
    beta: float,
    label_smoothing: float,
) -> tuple[jax.Array, dict]:
    """(objective sum, metric sums) over the pairs of a batch; the caller divides by the pair count."""
    fields = both_sides(batch)
    policy, tokens, aux = response_log_probs(graphdef, params, fields)
    reference, _, _ = response_log_probs(graphdef, jax.lax.stop_gradient(reference_params), fields)
    reference = jax.lax.stop_gradient(reference)
    policy_chosen, policy_rejected = jnp.split(policy, 2)
    reference_chosen, reference_rejected = jnp.split(reference, 2)
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(margin)
    losses = losses - label_smoothing * jax.nn.log_sigmoid(-margin)
    pairs = jnp.asarray(margin.shape[0], jnp.float32)
    sums = {
        "dpo_loss": jnp.sum(losses),
        "pairs": pairs,
        "reward_accuracy": jnp.sum((margin > 0).astype(jnp.float32)),
        "reward_margin": jnp.sum(margin),
        "chosen_reward": jnp.sum(chosen_reward),
        "rejected_reward": jnp.sum(rejected_reward),
        "chosen_log_prob": jnp.sum(policy_chosen),
        "rejected_log_prob": jnp.sum(policy_rejected),
        "tokens": jnp.sum(tokens),
    }
    objective = sums["dpo_loss"]
    for name, coefficient in auxiliary_loss_weights(model_cfg).items():
        if name in aux:
            sums[name] = jnp.sum(aux[name]) * pairs
            objective = objective + coefficient * sums[name]
    return objective, sums


def dpo_train_step(
    state: dict,
    batch: Batch,
    reference_params: Any,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    model_cfg: ml_collections.ConfigDict,
    beta: float,
    label_smoothing: float,
    num_microbatches: int,
):
    def loss_sums(params, microbatch):
        return dpo_loss_sums(graphdef, params, reference_params, microbatch, model_cfg, beta, label_smoothing)

    grads, sums = accumulate_gradients(loss_sums, state["params"], batch, num_microbatches)
    new_state, norms = apply_gradients(state, grads, sums["pairs"], optimizer)
    pairs = jnp.maximum(sums["pairs"], 1.0)
    metrics = {name: value / pairs for name, value in sums.items() if name not in ("pairs", "tokens")}
    metrics["loss"] = metrics.pop("dpo_loss")
    metrics["tokens"] = sums["tokens"]
    return new_state, metrics | norms


def jit_dpo_step(config: ml_collections.ConfigDict, setup: state_lib.ModelSetup, optimizer):
    """(state, batch, reference params) -> (state, metrics), jitted once with the mesh shardings."""
    shardings = state_lib.state_shardings(setup, optimizer)
    step = functools.partial(
        dpo_train_step,
        graphdef=setup.graphdef,
        optimizer=optimizer,
        model_cfg=config.model,
        beta=float(config.train.dpo_beta),
        label_smoothing=float(config.train.dpo_label_smoothing),
        num_microbatches=config.train.microbatches,
    )
    return jax.jit(
        step,
        in_shardings=(shardings, state_lib.batch_sharding(setup.mesh, setup.rules), setup.param_shardings),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
