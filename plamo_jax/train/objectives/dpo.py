"""Direct Preference Optimization (Rafailov et al. 2023) over preference pairs.

loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]),
with log-probabilities summed over the response tokens only; `label_smoothing` e gives the
conservative variant (1 - e) * loss(margin) + e * loss(-margin). The reference is the frozen
starting checkpoint (checkpoint.init_params), held sharded like the parameters and passed to the
step (not checkpointed: a resumed run reloads it). Chosen and rejected sequences go through one
forward pass as a batch of 2B rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from plamo_jax.data import batch as batch_layout
from plamo_jax.errors import ConfigError
from plamo_jax.posttrain.preference_data import PREFERENCE_FORMAT, SIDES, PreferenceIterator
from plamo_jax.train.continuation import check_architecture, load_init_params
from plamo_jax.train.losses import sequence_log_probs
from plamo_jax.train.objectives.base import Batch, Config, Objective
from plamo_jax.train.step import MAX_PREFIX, add_auxiliary_losses, add_statistics, forward


def both_sides(batch: Batch) -> Batch:
    """[B, L] chosen_* and rejected_* fields -> [2B, L] fields, chosen rows first."""
    return {field: jnp.concatenate([batch[batch_layout.prefixed(side, field)] for side in SIDES])
            for field in batch_layout.FIELDS}


def response_log_probs(graphdef, params, fields: Batch):
    """(summed log p of the masked-in targets per row, masked-in tokens per row, aux)."""
    logits, aux = forward(graphdef, params, fields)
    log_probs, tokens = sequence_log_probs(logits, fields["target_ids"], fields["loss_mask"])
    return log_probs, tokens, {**aux, "max_output_logit": jnp.max(jax.lax.stop_gradient(logits))}


def _require(condition: bool, key: str, value, expected: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key}={value!r}: expected {expected}")


class DirectPreferenceOptimization(Objective):
    name = "dpo"
    data_formats = (PREFERENCE_FORMAT,)
    sequence_prefixes = SIDES
    normalizer = "pairs"
    flops_factor = 4 / 3  # the reference adds a forward pass: 1/3 of forward + backward
    frozen_copies = 1

    def validate(self, config: Config) -> None:
        super().validate(config)
        t = config.train
        _require(bool(config.checkpoint.init_params), "checkpoint.init_params", config.checkpoint.init_params,
                 "the checkpoint DPO starts from and keeps as its frozen reference")
        _require(t.dpo_beta > 0, "train.dpo_beta", t.dpo_beta, "a number > 0")
        _require(0 <= t.dpo_label_smoothing < 0.5, "train.dpo_label_smoothing", t.dpo_label_smoothing,
                 "in [0, 0.5)")

    def make_iterator(self, data_config, *, seq_len, global_batch_size, seed, process_index=0,
                      process_count=1, batch_sizes=None):
        return PreferenceIterator(data_config, seq_len=seq_len, global_batch_size=global_batch_size,
                                  seed=seed, process_index=process_index, process_count=process_count,
                                  batch_sizes=batch_sizes)

    def check_frozen(self, config):
        check_architecture(config, config.checkpoint.init_params, "checkpoint.init_params")

    def load_frozen(self, config, setup):
        return load_init_params(config, setup)

    def abstract_frozen(self, config, setup):
        def placed(leaf, sharding):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

        return jax.tree.map(placed, setup.abstract_params, setup.param_shardings)

    def start_params(self, frozen):
        return jax.tree.map(jnp.copy, frozen)  # the step donates the state; the reference stays

    def loss_sums(self, graphdef, params, frozen, batch, config):
        beta, smoothing = float(config.train.dpo_beta), float(config.train.dpo_label_smoothing)
        fields = both_sides(batch)
        policy, tokens, aux = response_log_probs(graphdef, params, fields)
        reference, _, _ = response_log_probs(graphdef, jax.lax.stop_gradient(frozen), fields)
        reference = jax.lax.stop_gradient(reference)
        policy_chosen, policy_rejected = jnp.split(policy, 2)
        reference_chosen, reference_rejected = jnp.split(reference, 2)
        chosen_reward = beta * (policy_chosen - reference_chosen)
        rejected_reward = beta * (policy_rejected - reference_rejected)
        margin = chosen_reward - rejected_reward
        losses = -(1 - smoothing) * jax.nn.log_sigmoid(margin) - smoothing * jax.nn.log_sigmoid(-margin)
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
        objective = add_auxiliary_losses(sums["dpo_loss"], sums, aux, config.model, pairs)
        add_statistics(sums, aux, pairs)
        return objective, sums

    def metrics(self, sums):
        pairs = jnp.maximum(sums["pairs"], 1.0)
        metrics = {name: value if name.startswith(MAX_PREFIX) else value / pairs
                   for name, value in sums.items() if name not in ("pairs", "tokens")}
        metrics["loss"] = metrics.pop("dpo_loss")
        metrics["tokens"] = sums["tokens"]
        return metrics


DPO = DirectPreferenceOptimization()
