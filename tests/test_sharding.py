"""One training step on 8 simulated devices equals the single-device step, for every mesh layout."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import mesh_of, random_batch, small_config

from plamo_jax.configuration import mesh_rules
from plamo_jax.models import attention as attention_module
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import guards
from plamo_jax.train import state as state_lib
from plamo_jax.train.objectives.lm import LANGUAGE_MODELING, lm_loss_sums
from plamo_jax.train.optimizer import make_optimizer
from plamo_jax.train.step import make_train_step

MESHES = {
    "data=8": dict(data=8),
    "fsdp=8": dict(fsdp=8),
    "tensor=4,data=2": dict(tensor=4, data=2),
    "sequence=2,fsdp=4": dict(sequence=2, fsdp=4),
    "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2),
}


def run_step(config, mesh, host_params, host_batch):
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    shardings = state_lib.state_shardings(setup, optimizer)
    params = jax.device_put(host_params, setup.param_shardings)
    state = {
        "step": jax.device_put(np.int32(0), shardings["step"]),
        "params": params,
        "opt_state": jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params),
        "rng": jax.device_put(np.zeros(2, np.uint32), shardings["rng"]),
        "guard": jax.device_put(guards.initial_state(state_lib.DEFAULT_GUARD), shardings["guard"]),
    }
    batch_sharding = state_lib.batch_sharding(mesh, rules)
    batch = jax.device_put(host_batch, batch_sharding)

    def loss_and_grads(params, batch):
        objective, sums = lm_loss_sums(setup.graphdef, params, batch, config.model, config.train.z_loss)
        return objective / sums["tokens"]

    with sharding_context(mesh, rules):
        grad_fn = jax.jit(
            jax.value_and_grad(loss_and_grads), in_shardings=(setup.param_shardings, batch_sharding)
        )
        loss, grads = grad_fn(params, batch)
        step_fn = jax.jit(
            make_train_step(LANGUAGE_MODELING, config, setup.graphdef, optimizer),
            in_shardings=(shardings, batch_sharding, None),
            out_shardings=(shardings, None),
        )
        new_state, metrics = step_fn(state, batch, None)
    return jax.device_get((loss, grads, new_state["params"], metrics)), (params, batch)


@pytest.fixture(scope="module")
def reference():
    config = small_config()
    mesh = mesh_of(data=1)
    setup = state_lib.setup_model(config.model, mesh, mesh_rules(config))
    host_params = jax.device_get(state_lib.init_params(config.model, setup, seed=0))
    host_batch = random_batch(np.random.default_rng(0), 8, 16, config.model.vocab_size)
    results, _ = run_step(config, mesh, host_params, host_batch)
    return config, host_params, host_batch, results


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_equals_single_device(reference, name):
    config, host_params, host_batch, expected = reference
    config.mesh.update({"data": 1, **MESHES[name]})
    mesh = mesh_of(**MESHES[name])
    (loss, grads, new_params, metrics), device_inputs = run_step(config, mesh, host_params, host_batch)
    ref_loss, ref_grads, ref_params, ref_metrics = expected
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_params, ref_params)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    # The computation really was distributed: parameters and/or the batch are split across 8 devices.
    split = [x for x in jax.tree.leaves(device_inputs) if not x.sharding.is_fully_replicated]
    assert split and all(len(x.sharding.device_set) == 8 for x in split)


def test_parameters_are_born_sharded():
    """init_params returns arrays already split by the rules; no device holds a whole sharded weight."""
    config = small_config()
    mesh = mesh_of(fsdp=4, tensor=2)
    setup = state_lib.setup_model(config.model, mesh, mesh_rules(config))
    params = state_lib.init_params(config.model, setup, seed=0)
    q_proj = params["blocks"]["attn"]["q_proj"]  # [layers, embed, heads, head_dim]
    assert q_proj.sharding == setup.param_shardings["blocks"]["attn"]["q_proj"]
    layers, embed, heads, head_dim = q_proj.shape
    assert {shard.data.shape for shard in q_proj.addressable_shards} == {
        (layers, embed // 4, heads // 2, head_dim)
    }
    embedding = params["embed"]  # [vocab, embed]
    assert {s.data.shape for s in embedding.addressable_shards} == {
        (embedding.shape[0] // 2, embedding.shape[1] // 4)
    }


def test_sequence_parallelism_shards_activations_outside_attention():
    """Under sequence=2 without context parallelism, the residual stream is split along the sequence and
    attention sees whole sequences (tests/test_context_parallel.py covers attention split along it)."""
    config = small_config(context_parallel="none")
    mesh = mesh_of(sequence=2, fsdp=4)
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    params = state_lib.init_params(config.model, setup, seed=0)
    batch = jax.device_put(
        random_batch(np.random.default_rng(1), 8, 16, config.model.vocab_size),
        state_lib.batch_sharding(mesh, rules),
    )
    seen = {}
    real_attention = attention_module.dot_product_attention_with_max_logit

    def recording_attention(q, k, v, mask):
        jax.debug.inspect_array_sharding(k, callback=lambda s: seen.setdefault("keys", s))
        return real_attention(q, k, v, mask)

    def forward(params, batch):
        model = nnx.merge(setup.graphdef, params)
        x = model.embed_tokens(batch["input_ids"])
        jax.debug.inspect_array_sharding(x, callback=lambda s: seen.setdefault("residual", s))
        logits, _ = model(batch["input_ids"], batch["segment_ids"], batch["positions"])
        return logits

    attention_module.dot_product_attention_with_max_logit = recording_attention
    try:
        with sharding_context(mesh, rules):
            jax.jit(forward).lower(params, batch).compile()
    finally:
        attention_module.dot_product_attention_with_max_logit = real_attention
    residual = seen["residual"].shard_shape((8, 16, config.model.d_model))
    assert residual == (2, 8, config.model.d_model)  # batch over fsdp=4, sequence over sequence=2
    keys = seen["keys"].shard_shape((8, 16, config.model.num_kv_heads, config.model.head_dim))
    assert keys[1] == 16  # whole sequence inside attention


def test_a_batch_smaller_than_the_batch_axes_gives_the_same_logits():
    """A batch of 4 on an 8-way fsdp mesh: the activation constraints leave the batch whole instead of
    asking for an 8-way split of 4 rows (which jax >= 0.11 refuses to compile)."""
    config = small_config()
    host_params = jax.device_get(state_lib.init_params(config.model, state_lib.setup_model(
        config.model, mesh_of(data=1), mesh_rules(config)), seed=0))
    batch = random_batch(np.random.default_rng(1), 4, 16, config.model.vocab_size)
    logits = {}
    for name, mesh in (("one device", mesh_of(data=1)), ("fsdp=8", mesh_of(fsdp=8))):
        rules = mesh_rules(config)
        setup = state_lib.setup_model(config.model, mesh, rules)
        params = jax.device_put(host_params, setup.param_shardings)

        def forward(params, ids, segments, positions, setup=setup):
            return nnx.merge(setup.graphdef, params)(ids, segments, positions)[0]

        with sharding_context(mesh, rules):
            logits[name] = jax.device_get(jax.jit(forward)(
                params, batch["input_ids"], batch["segment_ids"], batch["positions"]))
    np.testing.assert_allclose(logits["fsdp=8"], logits["one device"], rtol=2e-5, atol=2e-5)
