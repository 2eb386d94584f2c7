"""Schedules, the weight-decay mask, and the FLOPs formula against XLA's own count."""

import jax
import numpy as np
import pytest
from helpers import mesh_of, random_batch, small_config

from plamo_jax.configuration import mesh_rules
from plamo_jax.models.flops import mean_attended_keys
from plamo_jax.models.masks import attention_mask
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import flops as flops_lib
from plamo_jax.train import state as state_lib
from plamo_jax.train.objectives.lm import LANGUAGE_MODELING
from plamo_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from plamo_jax.train.step import make_train_step


def optimizer_config(**changes):
    config = small_config()
    config.optimizer.update(dict(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1, **changes))
    return config.optimizer


def test_warmup_then_cosine_to_floor():
    schedule = learning_rate_schedule(optimizer_config(schedule="cosine"), total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(5), 0.5, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 1.0, rtol=1e-6)
    np.testing.assert_allclose(schedule(60), 0.1 + 0.9 * 0.5, rtol=1e-5)  # half way down the cosine
    np.testing.assert_allclose(schedule(110), 0.1, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, halfway", [("linear", 0.55), ("cosine", 0.55), ("sqrt", 0.1 + 0.9 * (1 - 0.5**0.5))]
)
def test_warmup_stable_decay(shape, halfway):
    opt = optimizer_config(schedule="wsd", wsd_decay_fraction=0.2, wsd_decay_shape=shape)
    schedule = learning_rate_schedule(opt, total_steps=100)
    # warmup 10, stable until step 80, decay over the last 20 steps
    for step in (10, 40, 80):
        np.testing.assert_allclose(schedule(step), 1.0, rtol=1e-6)
    np.testing.assert_allclose(schedule(90), halfway, rtol=1e-5)
    np.testing.assert_allclose(schedule(100), 0.1, rtol=1e-5)


def test_weight_decay_skips_norms_and_embeddings():
    params = {
        "embed": 0,
        "final_norm": {"scale": 0},
        "blocks": {"attn": {"q_proj": 0, "q_norm": {"scale": 0}}, "mlp": {"gate": 0}},
        "lm_head": 0,
    }
    mask = decay_mask(params, "norm,bias,embed")
    assert mask == {
        "embed": False,
        "final_norm": {"scale": False},
        "blocks": {"attn": {"q_proj": True, "q_norm": {"scale": False}}, "mlp": {"gate": True}},
        "lm_head": True,
    }


@pytest.mark.parametrize("length, window", [(16, 0), (16, 5), (7, 20)])
def test_mean_attended_keys_counts_the_mask(length, window):
    mask = np.asarray(attention_mask(np.ones((1, length), np.int32), window))
    assert mean_attended_keys(length, window) == pytest.approx(mask.sum() / length)


def test_flops_formula_matches_xla_count():
    """XLA's count of the (unrolled) train step is within a few percent of the model-FLOPs formula."""
    config = small_config(d_model=256, num_heads=8, num_kv_heads=4, head_dim=32, mlp_dim=768, vocab_size=512)
    config.model.scan_unroll = config.model.num_layers  # XLA counts a loop body once
    mesh, rules = mesh_of(data=1), mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    optimizer = make_optimizer(config.optimizer, 10)
    step = jax.jit(make_train_step(LANGUAGE_MODELING, config, setup.graphdef, optimizer))
    batch = random_batch(np.random.default_rng(0), 4, 64, config.model.vocab_size)
    with sharding_context(mesh, rules):
        cost = step.lower(state_lib.abstract_state(setup, optimizer), batch, None).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    formula = flops_lib.train_flops_per_token(config.model, 64) * 4 * 64
    assert 0.95 < cost["flops"] / formula < 1.2
