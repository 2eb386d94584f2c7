"""train.loss_chunk: the LM head and the loss a chunk of positions at a time equal the whole-sequence
loss (objective, every metric sum, every gradient), on one device and under a mesh; and the config key
is validated."""

import jax
import numpy as np
import pytest
from helpers import initial_host_params, mesh_of, random_batch, small_config

from plamo_jax.configuration import mesh_rules, validate_config
from plamo_jax.errors import ConfigError
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import state as state_lib
from plamo_jax.train.objectives.lm import lm_loss_sums


def objective_sums_and_grads(config, mesh, host_params, host_batch, loss_chunk):
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    params = jax.device_put(host_params, setup.param_shardings)
    batch = jax.device_put(host_batch, state_lib.batch_sharding(mesh, rules))

    def loss(params):
        return lm_loss_sums(setup.graphdef, params, batch, config.model, 1e-3, loss_chunk)

    with sharding_context(mesh, rules):
        return jax.device_get(jax.jit(jax.value_and_grad(loss, has_aux=True))(params))


@pytest.mark.parametrize("tied,devices", [(True, 1), (False, 1), (False, 8)],
                         ids=["tied", "untied", "untied on data x fsdp x tensor"])
def test_the_chunked_loss_equals_the_whole_sequence_loss(tied, devices):
    config = small_config(tie_embeddings=tied)
    host_params = initial_host_params(config)
    batch = random_batch(np.random.default_rng(0), 8, config.train.seq_len, config.model.vocab_size)
    mesh = mesh_of(data=2, fsdp=2, tensor=2) if devices == 8 else mesh_of(jax.devices()[:1])
    (whole, whole_sums), whole_grads = objective_sums_and_grads(config, mesh, host_params, batch, 0)
    (chunked, chunked_sums), chunked_grads = objective_sums_and_grads(config, mesh, host_params, batch, 4)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    assert chunked_sums.keys() == whole_sums.keys()
    for name in whole_sums:
        np.testing.assert_allclose(chunked_sums[name], whole_sums[name], rtol=1e-6, err_msg=name)
    for got, want in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(whole_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)  # summation order: fp32 ulps


def test_a_chunk_that_does_not_divide_the_sequence_is_a_config_error():
    config = small_config()
    config.train.loss_chunk = 5  # seq_len 16
    message = r"train.loss_chunk=5: expected 0 or a positive divisor of train.seq_len=16"
    with pytest.raises(ConfigError, match=message):
        validate_config(config, 1)
