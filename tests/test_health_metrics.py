"""The health/* norms on every train.health_every-th step: the same figures as every step, nothing else
changed, and only those steps' lines in metrics.jsonl carry them."""

from __future__ import annotations

import json

import jax
import numpy as np
from helpers import mesh_of, random_batch, small_config

from plamo_jax.configuration import mesh_rules
from plamo_jax.train import objectives
from plamo_jax.train import state as state_lib
from plamo_jax.train.optimizer import make_optimizer
from plamo_jax.train.step import HEALTH_PREFIX, make_train_step
from plamo_jax.train.trainer import train

STEPS = 3


def run_steps(health_every: int) -> tuple[list[dict], list[dict]]:
    """(metrics of each of STEPS steps, the state before each step) from the same start and batches."""
    config = small_config()
    config.train.health_every = health_every
    setup = state_lib.setup_model(config.model, mesh_of(data=1), mesh_rules(config))
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    step = jax.jit(make_train_step(objectives.get_objective("lm"), config, setup.graphdef, optimizer))
    state = state_lib.init_state(config.model, setup, optimizer, seed=0)
    rng = np.random.default_rng(0)
    metrics, states = [], []
    for _ in range(STEPS):
        states.append(jax.device_get(state))
        state, step_metrics = step(state, random_batch(rng, 8, 16, config.model.vocab_size), None)
        metrics.append(jax.device_get(step_metrics))
    states.append(jax.device_get(state))
    return metrics, states


def test_health_norms_every_nth_step_equal_the_every_step_figures_and_change_nothing_else():
    every_metrics, every_states = run_steps(health_every=1)
    nth_metrics, nth_states = run_steps(health_every=STEPS)
    for step, (every, nth) in enumerate(zip(every_metrics, nth_metrics, strict=True), start=1):
        health = sorted(name for name in every if name.startswith(HEALTH_PREFIX))
        assert health and sorted(nth) == sorted(every)
        for name in every:
            if name.startswith(HEALTH_PREFIX) and step % STEPS:
                assert np.isnan(nth[name]).all(), (step, name)  # not computed on this step
            else:
                np.testing.assert_array_equal(nth[name], every[name], err_msg=f"step {step}: {name}")
    for every, nth in zip(jax.tree.leaves(every_states), jax.tree.leaves(nth_states), strict=True):
        np.testing.assert_array_equal(every, nth)
    # the reference: each block's parameter norm, with numpy, of the parameters the last step started from
    blocks = nth_states[STEPS - 1]["params"]["blocks"]
    squares = sum(np.sum(np.square(leaf.astype(np.float64)), axis=tuple(range(1, leaf.ndim)))
                  for leaf in jax.tree.leaves(blocks))
    np.testing.assert_allclose(nth_metrics[-1][f"{HEALTH_PREFIX}param_norm/blocks"], np.sqrt(squares),
                               rtol=1e-5)


def test_metrics_lines_carry_health_norms_on_their_steps_only(tmp_path):
    config = small_config(vocab_size=512)
    config.data.format = "text"
    config.train.update(steps=8, log_every=3, health_every=4, output_dir=str(tmp_path))
    config.mesh.update(data=-1)
    train(config)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 9))
    with_health = [line["step"] for line in lines if any(name.startswith(HEALTH_PREFIX) for name in line)]
    assert with_health == [4, 8]
    for line in lines:
        assert all(np.isfinite(value) for name, value in line.items() if name.startswith(HEALTH_PREFIX))
