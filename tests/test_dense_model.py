"""Dense decoder numerics against naive references: masking, RoPE, attention, loss, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import mesh_of, random_batch, small_config

from plamo_jax.configuration import mesh_rules
from plamo_jax.estimate.memory import nbytes, residual_avals
from plamo_jax.models.attention import dot_product_attention
from plamo_jax.models.decoder import Decoder
from plamo_jax.models.layers import apply_rope
from plamo_jax.models.masks import attention_mask
from plamo_jax.train import state as state_lib
from plamo_jax.train.losses import cross_entropy_sums, first_best_index
from plamo_jax.train.objectives.lm import LanguageModeling, lm_loss_sums
from plamo_jax.train.optimizer import make_optimizer
from plamo_jax.train.step import make_train_step


def test_no_token_sees_the_future_or_another_document():
    cfg = small_config().model
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    length = 12
    segment_ids = jnp.array([[1] * 5 + [2] * 4 + [3] * 3])
    positions = jnp.array([list(range(5)) + list(range(4)) + list(range(3))])
    tokens = jnp.arange(length)[None] % cfg.vocab_size + 7
    base, _ = model(tokens, segment_ids, positions)
    for perturbed in range(length):
        changed_tokens = tokens.at[0, perturbed].set((tokens[0, perturbed] + 101) % cfg.vocab_size)
        logits, _ = model(changed_tokens, segment_ids, positions)
        changed = np.abs(np.asarray(logits - base)).max(axis=-1)[0] > 1e-6
        expected = np.array(
            [
                query >= perturbed and segment_ids[0, query] == segment_ids[0, perturbed]
                for query in range(length)
            ]
        )
        np.testing.assert_array_equal(changed, expected, err_msg=f"perturbing token {perturbed}")


def test_attention_mask_window():
    segment_ids = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]])
    mask = np.asarray(attention_mask(segment_ids, window=2))[0, 0]
    for q in range(8):
        for k in range(8):
            assert mask[q, k] == (k <= q and q - k < 2 and segment_ids[0, q] == segment_ids[0, k])


def naive_attention(q, k, v, mask):
    """Loop over batch and heads; KV head for query head h is h // (H / K)."""
    batch, length, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            scores = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(dim)
            scores = np.where(mask[b, 0], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[b, :, h] = probs @ v[b, :, h // group]
    return out


def test_grouped_query_attention_matches_naive():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 10, 8, 16)).astype(np.float32)
    k = rng.normal(size=(2, 10, 2, 16)).astype(np.float32)
    v = rng.normal(size=(2, 10, 2, 16)).astype(np.float32)
    segment_ids = jnp.array([[1] * 4 + [2] * 6, [1] * 10])
    mask = attention_mask(segment_ids)
    np.testing.assert_allclose(
        dot_product_attention(q, k, v, mask), naive_attention(q, k, v, np.asarray(mask)), rtol=1e-5, atol=1e-5
    )


def test_rope_matches_rotation_matrices():
    """Rotate-half RoPE == rotating each pair (i, i + D/2) by angle pos * theta^(-2i/D)."""
    rng = np.random.default_rng(1)
    dim, theta = 8, 10000.0
    x = rng.normal(size=(1, 5, 1, dim)).astype(np.float32)
    positions = np.array([[0, 1, 2, 7, 30]])
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), theta))
    for t, pos in enumerate(positions[0]):
        for i in range(dim // 2):
            angle = pos * theta ** (-2 * i / dim)
            rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            expected = rotation @ np.array([x[0, t, 0, i], x[0, t, 0, i + dim // 2]])
            np.testing.assert_allclose([out[0, t, 0, i], out[0, t, 0, i + dim // 2]], expected, atol=1e-5)


def test_cross_entropy_and_z_loss_closed_form():
    logits = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]], np.float32)
    targets = np.array([[0, 2]])
    mask = np.array([[1.0, 1.0]], np.float32)
    sums = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=0.1)
    log_z = np.log(np.exp(logits).sum(-1))[0]
    expected_ce = (log_z[0] - 2.0) + (log_z[1] - 0.5)
    np.testing.assert_allclose(sums["cross_entropy"], expected_ce, rtol=1e-6)
    np.testing.assert_allclose(sums["z_loss"], 0.1 * (log_z**2).sum(), rtol=1e-6)
    assert float(sums["correct"]) == 1.0  # argmax is right for the first token only (ties pick index 0)
    masked = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.array([[0.0, 1.0]]), 0.1)
    np.testing.assert_allclose(masked["cross_entropy"], log_z[1] - 0.5, rtol=1e-6)
    assert float(masked["tokens"]) == 1.0


@pytest.mark.parametrize("vocab", [7, 50257])
def test_first_best_index_is_argmax_ties_included(vocab):
    rng = np.random.default_rng(vocab)
    logits = np.round(rng.normal(size=(3, 5, vocab)) * 2).astype(np.float32) / 2  # many ties at the maximum
    logits[0, 0] = -3.0  # every entry tied
    logits[0, 1, -1] = 100.0  # the last index alone
    best = first_best_index(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(best), np.argmax(logits, axis=-1))


class RowRecordingLM(LanguageModeling):
    """The LM objective, recording the rows each loss evaluation receives (a host callback at run time)."""

    def __init__(self):
        self.seen: list[np.ndarray] = []

    def loss_sums(self, graphdef, params, frozen, batch, config):
        jax.debug.callback(lambda ids: self.seen.append(np.asarray(ids)), batch["input_ids"])
        return super().loss_sums(graphdef, params, frozen, batch, config)


@pytest.mark.parametrize("microbatches", [2, 4])
def test_gradient_accumulation_equals_whole_batch(microbatches):
    config = small_config()
    mesh = mesh_of(data=1)
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    state = state_lib.init_state(config.model, setup, optimizer, seed=0)
    batch = random_batch(np.random.default_rng(3), 8, 16, config.model.vocab_size)

    def step(k):
        objective = RowRecordingLM()
        config.train.microbatches = k
        fn = make_train_step(objective, config.copy_and_resolve_references(), setup.graphdef, optimizer)
        return jax.device_get(jax.jit(fn)(state, batch, None)), objective.seen

    (whole_state, whole_metrics), whole_rows = step(1)
    (accumulated_state, accumulated_metrics), microbatch_rows = step(microbatches)
    # The loop really ran: k evaluations of B / k rows each, every row of the batch exactly once.
    assert [rows.shape for rows in whole_rows] == [(8, 16)]
    assert [rows.shape for rows in microbatch_rows] == [(8 // microbatches, 16)] * microbatches
    np.testing.assert_array_equal(np.sort(np.concatenate(microbatch_rows), axis=0),
                                  np.sort(batch["input_ids"], axis=0))
    for key in ("loss", "cross_entropy", "z_loss", "accuracy", "grad_norm", "tokens"):
        np.testing.assert_allclose(accumulated_metrics[key], whole_metrics[key], rtol=1e-5, err_msg=key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        accumulated_state["params"],
        whole_state["params"],
    )


def mean_loss_fn(config, batch, setup):
    def loss(p):
        objective, sums = lm_loss_sums(setup.graphdef, p, batch, config.model, config.train.z_loss)
        return objective / sums["tokens"]

    return loss


def loss_and_grads(config, params, batch, setup):
    return jax.jit(jax.value_and_grad(mean_loss_fn(config, batch, setup)))(params)


@pytest.mark.parametrize("policy", ["save_dots", "full"])
def test_rematerialisation_does_not_change_loss_or_gradients(policy):
    config = small_config()
    mesh, rules = mesh_of(data=1), mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    params = state_lib.init_params(config.model, setup, seed=0)
    batch = random_batch(np.random.default_rng(5), 4, 16, config.model.vocab_size)
    expected_loss, expected_grads = loss_and_grads(config, params, batch, setup)
    saved_without = residual_bytes(mean_loss_fn(config, batch, setup), params)
    config.model.remat = policy
    remat_setup = state_lib.setup_model(config.model, mesh, rules)
    loss, grads = loss_and_grads(config, params, batch, remat_setup)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, expected_grads)
    # The policy changed what the forward pass keeps for the backward pass (JAX's own residuals).
    saved_with = residual_bytes(mean_loss_fn(config, batch, remat_setup), params)
    assert saved_with < 0.8 * saved_without, (policy, saved_with, saved_without)


def residual_bytes(fn, params) -> float:
    return nbytes(residual_avals(fn, params))


def test_policies_keep_less_the_more_they_recompute():
    config = small_config()
    mesh, rules = mesh_of(data=1), mesh_rules(config)
    batch = random_batch(np.random.default_rng(5), 4, 16, config.model.vocab_size)
    saved = {}
    for policy in ("none", "save_dots", "full"):
        config.model.remat = policy
        setup = state_lib.setup_model(config.model, mesh, rules)
        saved[policy] = residual_bytes(mean_loss_fn(config, batch, setup), setup.abstract_params)
    assert saved["full"] < saved["save_dots"] < saved["none"], saved


def test_bfloat16_compute_keeps_fp32_parameters_and_loss():
    config = small_config()
    mesh, rules = mesh_of(data=1), mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    params = state_lib.init_params(config.model, setup, seed=0)
    batch = random_batch(np.random.default_rng(6), 4, 16, config.model.vocab_size)
    fp32_loss, _ = loss_and_grads(config, params, batch, setup)
    config.model.dtype = "bfloat16"
    bf16_setup = state_lib.setup_model(config.model, mesh, rules)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16_setup.abstract_params))
    bf16_loss, bf16_grads = loss_and_grads(config, params, batch, bf16_setup)
    assert bf16_loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(bf16_grads))
    np.testing.assert_allclose(bf16_loss, fp32_loss, rtol=2e-2)
    model = nnx.merge(bf16_setup.graphdef, params)
    logits, _ = model(
        jnp.asarray(batch["input_ids"]), jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"])
    )
    assert logits.dtype == jnp.float32
