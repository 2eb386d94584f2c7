"""Small shared builders for tests."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from plamo_jax.configuration import default_config, mesh_rules
from plamo_jax.parallel import context
from plamo_jax.parallel.rules import MESH_AXES, sharding_context
from plamo_jax.train import state as state_lib
from plamo_jax.train.objectives.lm import LANGUAGE_MODELING, lm_loss_sums
from plamo_jax.train.optimizer import make_optimizer
from plamo_jax.train.step import make_train_step

make_train_iterator = LANGUAGE_MODELING.make_iterator  # text and chat corpora, as training reads them


def small_config(**model_overrides):
    """A dense config small enough for CPU tests; heads/kv heads/vocab divide a tensor axis of 4."""
    config = default_config()
    m = config.model
    m.vocab_size, m.d_model, m.num_layers = 256, 64, 2
    m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 8, 4, 16, 128
    m.qk_norm = True
    for key, value in model_overrides.items():
        m[key] = value
    config.train.global_batch_size, config.train.seq_len = 8, 16
    config.train.steps = 10
    config.checkpoint.enabled = False
    return config


def mesh_of(devices=None, **sizes) -> Mesh:
    """Mesh over the first prod(sizes) devices with the project's axis order."""
    shape = [sizes.get(axis, 1) for axis in MESH_AXES]
    count = int(np.prod(shape))
    devices = (devices or jax.devices())[:count]
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def initial_host_params(config, seed: int = 0):
    """A model's initial parameters as host arrays (to place on any mesh)."""
    setup = state_lib.setup_model(config.model, mesh_of(data=1), mesh_rules(config))
    return jax.device_get(state_lib.init_params(config.model, setup, seed=seed))


def one_device_step(config, seed: int = 0):
    """(jitted language-modelling train step, its initial state) of `config` on one device."""
    setup = state_lib.setup_model(config.model, mesh_of(data=1), mesh_rules(config))
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    step = jax.jit(make_train_step(LANGUAGE_MODELING, config, setup.graphdef, optimizer))
    return step, state_lib.init_state(config.model, setup, optimizer, seed=seed)


def loss_and_grads(config, mesh, host_params, host_batch, balanced: bool = False):
    """(mean loss without z-loss, its gradients) of one batch on `mesh`, fetched to the host.

    balanced: lay the batch out for context parallelism's causal balance, as the train step does.
    """
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    params = jax.device_put(host_params, setup.param_shardings)
    batch = jax.device_put(host_batch, state_lib.batch_sharding(mesh, rules))

    def loss(params, batch):
        if balanced:
            batch = context.lay_out_batch(batch, mesh.shape["sequence"])
        with context.balanced_layout(balanced):
            objective, sums = lm_loss_sums(setup.graphdef, params, batch, config.model, 0.0)
        return objective / sums["tokens"]

    with sharding_context(mesh, rules):
        return jax.device_get(jax.jit(jax.value_and_grad(loss))(params, batch))


def random_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, max_docs: int = 3):
    """A packed batch: random tokens, random document boundaries, positions restarting per document."""
    input_ids = rng.integers(0, vocab, (batch, length), dtype=np.int32)
    target_ids = rng.integers(0, vocab, (batch, length), dtype=np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=max_docs - 1, replace=False))
        bounds = [0, *cuts.tolist(), length]
        for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            segment_ids[row, start:end] = doc + 1
            positions[row, start:end] = np.arange(end - start)
    loss_mask = (rng.random((batch, length)) > 0.1).astype(np.float32)
    return {
        "input_ids": input_ids,
        "target_ids": target_ids,
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": loss_mask,
    }


def random_attention_inputs(seed, batch=2, length=37, heads=4, kv_heads=2, head_dim=8):
    """fp32 q [B, L, H, D], k, v [B, L, K, D], segment ids (row 0: two packed documents, row 1: trailing
    padding) and an upstream gradient for the output."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, length, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, length, kv_heads, head_dim)).astype(np.float32)
    segments = np.ones((batch, length), np.int32)
    segments[0, length // 2:] = 2
    segments[1, length - 5:] = 0
    upstream = rng.standard_normal(q.shape).astype(np.float32)
    return q, k, v, segments, upstream
