"""The step's norms (the guard's global ones and the health/* ones per group) against numpy on the
parameters the step starts from and returns."""

from __future__ import annotations

import jax
import numpy as np
from helpers import one_device_step, random_batch, small_config


def group_norms(params: dict) -> dict[str, np.ndarray]:
    """L2 norm per group in float64: per layer for the stacked blocks, one number otherwise."""
    norms = {}
    for group, subtree in params.items():
        leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(subtree)]
        first = 1 if group == "blocks" else 0
        norms[group] = np.sqrt(sum(np.sum(np.square(leaf), axis=tuple(range(first, leaf.ndim)))
                                   for leaf in leaves))
    return norms


def test_step_norms_equal_numpy_norms_of_the_parameters_and_the_update():
    config = small_config()
    step, state = one_device_step(config)
    rng = np.random.default_rng(0)
    state, _ = step(state, random_batch(rng, 8, 16, config.model.vocab_size), None)  # past lr = 0
    before = jax.device_get(state)
    after, metrics = jax.device_get(step(state, random_batch(rng, 8, 16, config.model.vocab_size), None))
    new_norms = group_norms(after["params"])
    update_norms = group_norms(jax.tree.map(lambda new, old: np.float64(new) - np.float64(old),
                                            after["params"], before["params"]))
    assert {"blocks", "embed", "final_norm"} <= set(new_norms)
    for group, norm in new_norms.items():
        np.testing.assert_allclose(metrics[f"health/param_norm/{group}"], norm, rtol=1e-5, err_msg=group)
        np.testing.assert_allclose(metrics[f"health/update_ratio/{group}"], update_norms[group] / norm,
                                   rtol=1e-3, err_msg=group)
        assert np.all(metrics[f"health/grad_norm/{group}"] > 0), group
    param_squares = sum(np.sum(norm**2) for norm in new_norms.values())
    np.testing.assert_allclose(metrics["param_norm"], np.sqrt(param_squares), rtol=1e-5)
    grad_squares = sum(np.sum(np.float64(metrics[f"health/grad_norm/{group}"]) ** 2) for group in new_norms)
    np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(grad_squares), rtol=1e-5)
