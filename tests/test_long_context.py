"""Long-context continuation (configs/plamo2_tiny_long.py): a plamo2_tiny checkpoint saved with a sliding
window continues under full attention through checkpoint.init_params, the change is logged by name, and
the continued model's loss at 4x the pre-training length with the sequence sharded 4 ways (ring context
parallelism, load-balanced layout) equals the single-device loss of the same parameters.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from helpers import mesh_of, random_batch

from plamo_jax.configuration import load_recipe, mesh_rules
from plamo_jax.parallel import context
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import state as state_lib
from plamo_jax.train.checkpoint import load_params, save_params
from plamo_jax.train.continuation import check_sources, load_init_params
from plamo_jax.train.objectives.lm import lm_loss_sums
from plamo_jax.train.run import build_run


def mean_cross_entropy(config, mesh, params, host_batch) -> tuple[float, str]:
    """(cross entropy per token of one batch on `mesh`, laid out as the training step lays it out, the
    lowered program's text)."""
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    params = jax.device_put(params, setup.param_shardings)
    batch = jax.device_put(host_batch, state_lib.batch_sharding(mesh, rules))
    shards = mesh.shape["sequence"]
    balanced = context.load_balanced(config.model, shards)

    def loss(params, batch):
        if balanced:
            batch = context.lay_out_batch(batch, shards)
        with context.balanced_layout(balanced):
            _, sums = lm_loss_sums(setup.graphdef, params, batch, config.model, 0.0)
        return sums["cross_entropy"] / sums["tokens"]

    with sharding_context(mesh, rules):
        lowered = jax.jit(loss).lower(params, batch)
        return float(lowered.compile()(params, batch)), lowered.as_text()


def test_windowed_checkpoint_continues_with_full_attention_under_ring_context_parallelism(tmp_path, caplog):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    pretrained = load_recipe("plamo2_tiny")
    assert pretrained.model.attention_window > 0  # the saved model has sliding-window layers
    single = mesh_of(data=1)
    setup = state_lib.setup_model(pretrained.model, single, mesh_rules(pretrained))
    saved_params = jax.device_get(state_lib.init_params(pretrained.model, setup, seed=0))
    checkpoint = save_params(tmp_path / "pretrained", saved_params, pretrained).parent

    config = load_recipe("plamo2_tiny_long")
    config.train.output_dir = str(tmp_path / "long")
    config.checkpoint.init_params = str(checkpoint)
    config.train.global_batch_size = 2  # one row per data shard keeps the test fast
    assert config.train.seq_len == 4 * pretrained.train.seq_len
    assert config.model.attention_window == 0 and config.model.context_parallel == "ring"
    run = build_run(config, jax.devices()[:8])
    assert dict(run.mesh.shape)["sequence"] == 4

    with caplog.at_level(logging.WARNING, logger="plamo_jax.train.continuation"):
        check_sources(config, run.objective)  # what the trainer runs before it reads init_params
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("model.attention_window=0 differs from the checkpoint's 64") for m in warnings), \
        warnings
    assert not any("full_attention_layers" in m for m in warnings), warnings  # unchanged: not reported
    params = load_init_params(config, run.setup)  # read straight into the 4 x 2 mesh's shardings
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved_params)

    batch = random_batch(np.random.default_rng(0), 2, config.train.seq_len, config.model.vocab_size)
    sharded, program = mean_cross_entropy(config, run.mesh, params, batch)
    assert "collective_permute" in program  # the ring really passed key/value blocks between shards
    reference_config = load_recipe("plamo2_tiny_long")
    reference_config.mesh.update(sequence=1, data=1)
    host_params, _ = load_params(checkpoint)  # the same parameters, as host arrays
    reference, _ = mean_cross_entropy(reference_config, single, host_params, batch)
    np.testing.assert_allclose(sharded, reference, rtol=1e-5)
    assert 5.0 < reference < 7.5  # an untrained model over 512 ids: about log(512) = 6.24
