"""Logit distillation (Hinton et al. 2015) from a frozen teacher checkpoint, on text / chat corpora.

Per masked-in token, with student logits s, teacher logits t and temperature T:

    p = softmax(t / T),  log q = log_softmax(s / T),  kl = sum_v p_v (log p_v - log q_v)
    loss = (1 - alpha) * T^2 * kl + alpha * cross_entropy(s, target)     (+ z-loss, auxiliary losses)

forward KL with the teacher as the target; T^2 keeps the soft gradient's scale independent of T.
Top-k (train.distill_top_k = k > 0): ids = the teacher's k largest logits; p = softmax(t[ids] / T), the
teacher renormalised over them; log q = (s / T - logsumexp(s / T))[ids], the student's full-vocabulary
log-probabilities gathered at those ids and *not* renormalised:

    kl_k = sum_{i in ids} p_i (log p_i - log q_i)  >= 0,

so student mass outside the teacher's top k is still penalised, and k = vocab_size is the full KL. The
backward pass keeps [B, L, k] teacher probabilities instead of [B, L, V].

The teacher is train.teacher_checkpoint (a training or `save_params` checkpoint): its saved config gives
its model (any family or size with this run's vocab_size); it is read once into its own shardings on
the run's mesh, like DPO's reference, and runs under stop_gradient. It is not checkpointed: a resumed
run reloads it. The student starts from checkpoint.init_params (e.g. a pruned teacher) or at random.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from plamo_jax.configuration import mesh_sizes
from plamo_jax.errors import CheckpointError, ConfigError
from plamo_jax.models import registry
from plamo_jax.train import state as state_lib
from plamo_jax.train.checkpoint import load_config, load_params, params_metadata
from plamo_jax.train.losses import cross_entropy_sums
from plamo_jax.train.objectives.base import Batch, Config, Objective
from plamo_jax.train.objectives.lm import LANGUAGE_MODELING
from plamo_jax.train.step import MAX_PREFIX, add_auxiliary_losses, add_statistics, forward

log = logging.getLogger(__name__)

TEACHER_KEY = "train.teacher_checkpoint"


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The frozen teacher the step receives: its parameters (traced) and graph definition (static)."""

    params: Any
    graphdef: nnx.GraphDef


# The graphdef is jit-static metadata, so the teacher passes through the jitted step as one argument.
jax.tree_util.register_dataclass(Teacher, data_fields=["params"], meta_fields=["graphdef"])


# -- the loss -------------------------------------------------------------------------------------

def full_kl(student_BLV: jax.Array, teacher_BLV: jax.Array, temperature: float) -> jax.Array:
    """KL(softmax(t / T) || softmax(s / T)) per token [B, L], in fp32."""
    log_p = jax.nn.log_softmax(teacher_BLV.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_BLV.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def top_k_kl(student_BLV: jax.Array, teacher_BLV: jax.Array, temperature: float, k: int) -> jax.Array:
    """The top-k KL of the module docstring per token [B, L], in fp32."""
    top_logits, ids = jax.lax.top_k(teacher_BLV.astype(jnp.float32), k)
    log_p = jax.nn.log_softmax(top_logits / temperature, axis=-1)
    scaled = student_BLV.astype(jnp.float32) / temperature
    # Gathering before normalising keeps only [B, L, k] student values beside the logsumexp.
    log_q = jnp.take_along_axis(scaled, ids, axis=-1) - jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distill_sums(student_BLV: jax.Array, teacher_BLV: jax.Array, targets_BL: jax.Array,
                 loss_mask_BL: jax.Array, *, temperature: float, alpha: float, top_k: int,
                 z_loss: float) -> dict[str, jax.Array]:
    """Masked sums: distill_loss (the mixed objective), kl, and cross_entropy_sums' entries."""
    sums = cross_entropy_sums(student_BLV, targets_BL, loss_mask_BL, z_loss)
    teacher = jax.lax.stop_gradient(teacher_BLV)
    kl = top_k_kl(student_BLV, teacher, temperature, top_k) if top_k else full_kl(student_BLV, teacher,
                                                                                   temperature)
    sums["kl"] = jnp.sum(kl * loss_mask_BL.astype(jnp.float32))
    sums["distill_loss"] = (1 - alpha) * temperature**2 * sums["kl"] + alpha * sums["cross_entropy"]
    return sums


# -- the teacher ----------------------------------------------------------------------------------

def _require(condition: bool, key: str, value, expected: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key}={value!r}: expected {expected}")


def _teacher_error(config: Config, problem: str) -> ConfigError:
    return ConfigError(f"config key {TEACHER_KEY}={config.train.teacher_checkpoint!r}: {problem}")


def teacher_saved_config(config: Config) -> Config:
    """The config the teacher's checkpoint was saved with (its model, its tokenizer)."""
    try:
        return load_config(config.train.teacher_checkpoint)
    except CheckpointError as error:
        raise _teacher_error(config, str(error)) from None


def teacher_model_config(config: Config) -> Config:
    return teacher_saved_config(config).model


def teacher_setup(config: Config, setup: state_lib.ModelSetup) -> state_lib.ModelSetup:
    """The teacher laid out on the student's mesh with the student's rules."""
    return state_lib.setup_model(teacher_model_config(config), setup.mesh, setup.rules)


class Distillation(Objective):
    name = "distill"
    data_formats = LANGUAGE_MODELING.data_formats

    def validate(self, config: Config) -> None:
        super().validate(config)
        t = config.train
        _require(bool(t.teacher_checkpoint), TEACHER_KEY, t.teacher_checkpoint,
                 "the checkpoint of the teacher to distill from")
        _require(t.distill_temperature > 0, "train.distill_temperature", t.distill_temperature,
                 "a number > 0")
        _require(0 <= t.distill_alpha <= 1, "train.distill_alpha", t.distill_alpha, "in [0, 1]")
        _require(isinstance(t.distill_top_k, int) and 0 <= t.distill_top_k <= config.model.vocab_size,
                 "train.distill_top_k", t.distill_top_k,
                 f"an integer in [0, model.vocab_size={config.model.vocab_size}] (0 = every token)")

    def make_iterator(self, data_config, *, seq_len, global_batch_size, seed, process_index=0,
                      process_count=1, batch_sizes=None):
        return LANGUAGE_MODELING.make_iterator(
            data_config, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
            process_index=process_index, process_count=process_count, batch_sizes=batch_sizes)

    def check_frozen(self, config):
        saved = teacher_saved_config(config)
        teacher = saved.model
        if teacher.vocab_size != config.model.vocab_size:
            raise _teacher_error(config, f"the teacher's model.vocab_size={teacher.vocab_size} differs from "
                                         f"model.vocab_size={config.model.vocab_size}; expected a teacher "
                                         "with this run's vocabulary and tokenizer")
        try:
            registry.validate_model(teacher, mesh_sizes(config, jax.device_count()))
            params_metadata(config.train.teacher_checkpoint)
        except (ConfigError, CheckpointError) as error:
            raise _teacher_error(config, f"the teacher does not fit this run: {error}") from None
        if saved.data.tokenizer != config.data.tokenizer:  # one tokenizer may live at two paths: warn only
            log.warning("the teacher was trained with data.tokenizer=%r, this run reads %r; expected the "
                        "same tokenizer", saved.data.tokenizer, config.data.tokenizer)

    def load_frozen(self, config, setup):
        teacher = teacher_setup(config, setup)
        params, _ = load_params(config.train.teacher_checkpoint, shardings=teacher.param_shardings)
        return Teacher(params, teacher.graphdef)

    def abstract_frozen(self, config, setup):
        teacher = teacher_setup(config, setup)

        def placed(leaf, sharding):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

        return Teacher(jax.tree.map(placed, teacher.abstract_params, teacher.param_shardings),
                       teacher.graphdef)

    def frozen_models(self, config):
        return (teacher_model_config(config),)

    def flops_factor_of(self, config):
        """1 + teacher forward / student forward + backward (3 x forward), per token."""
        teacher, student, seq_len = teacher_model_config(config), config.model, config.train.seq_len
        teacher_forward = registry.get_family(teacher).forward_flops_per_token(teacher, seq_len)
        student_forward = registry.get_family(student).forward_flops_per_token(student, seq_len)
        return 1 + teacher_forward / (3 * student_forward)

    def loss_sums(self, graphdef, params, frozen: Teacher, batch: Batch, config):
        t = config.train
        logits, aux = forward(graphdef, params, batch)
        teacher_logits, _ = forward(frozen.graphdef, jax.lax.stop_gradient(frozen.params), batch)
        sums = distill_sums(logits, teacher_logits, batch["target_ids"], batch["loss_mask"],
                            temperature=float(t.distill_temperature), alpha=float(t.distill_alpha),
                            top_k=int(t.distill_top_k), z_loss=t.z_loss)
        objective = add_auxiliary_losses(sums["distill_loss"] + sums["z_loss"], sums, aux, config.model,
                                         sums["tokens"])
        add_statistics(sums, aux, sums["tokens"])
        sums[MAX_PREFIX + "output_logit"] = jnp.max(jax.lax.stop_gradient(logits))
        return objective, sums

    def metrics(self, sums):
        """LM's metrics (cross_entropy, accuracy, kl per token, ...) with the distillation loss as loss."""
        metrics = LANGUAGE_MODELING.metrics(sums)
        metrics["loss"] = metrics.pop("distill_loss") + metrics["z_loss"]
        return metrics


DISTILL = Distillation()
