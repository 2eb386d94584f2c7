"""Flash (blockwise) attention equals the dense path in values and gradients, inside the models and
under sharding, and needs far less memory (XLA's own analysis of the compiled backward)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    initial_host_params,
    loss_and_grads,
    mesh_of,
    random_attention_inputs,
    random_batch,
    small_config,
)

from plamo_jax.configuration import load_recipe
from plamo_jax.models import attention as attention_module
from plamo_jax.models.attention import dot_product_attention, dot_product_attention_with_max_logit
from plamo_jax.models.decoder import Decoder
from plamo_jax.models.flash_attention import flash_attention, flash_attention_with_max_logit
from plamo_jax.models.masks import attention_mask

random_inputs = random_attention_inputs


@pytest.mark.parametrize("length,block,window",
                         [(37, 8, 0), (37, 8, 5), (37, 64, 0), (48, 16, 12), (33, 33, 0)])
def test_values_and_gradients_equal_dense_attention(length, block, window):
    q, k, v, segments, upstream = random_inputs(length, length=length)

    def dense(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, attention_mask(segments, window)) * upstream)

    def flash(q, k, v):
        return jnp.sum(flash_attention(q, k, v, segments, window, block) * upstream)

    np.testing.assert_allclose(flash_attention(q, k, v, segments, window, block),
                               dot_product_attention(q, k, v, attention_mask(segments, window)), atol=2e-6)
    for got, expected in zip(jax.grad(flash, argnums=(0, 1, 2))(q, k, v),
                             jax.grad(dense, argnums=(0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(got, expected, atol=5e-6)


@pytest.mark.parametrize("window", [0, 5])
def test_both_kernels_report_the_largest_attended_logit(window):
    """The health statistic: max over allowed (query, key) of q.k / sqrt(d), from a naive loop."""
    q, k, v, segments, _ = random_inputs(29, length=29)
    mask = np.asarray(attention_mask(segments, window))[:, 0]
    group = q.shape[2] // k.shape[2]
    naive = -np.inf
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            scores = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(q.shape[-1])
            naive = max(naive, scores[mask[b]].max())
    _, dense_max = dot_product_attention_with_max_logit(q, k, v, attention_mask(segments, window))
    _, flash_max = flash_attention_with_max_logit(q, k, v, segments, window, 8)
    np.testing.assert_allclose([dense_max, flash_max], [naive, naive], rtol=1e-5)


@pytest.fixture
def flash_calls(monkeypatch):
    """Windows of every traced flash attention call made by the attention module."""
    calls = []
    real = attention_module.flash_attention_with_max_logit
    monkeypatch.setattr(attention_module, "flash_attention_with_max_logit",
                        lambda q, k, v, segments, window, block, tokens=None: calls.append(window) or real(
                            q, k, v, segments, window, block, tokens))
    return calls


@pytest.mark.parametrize("mesh_sizes", [dict(data=1), dict(data=2, tensor=2), dict(fsdp=2, sequence=2)],
                         ids=["one device", "data=2,tensor=2", "fsdp=2,sequence=2"])
def test_model_step_with_flash_equals_dense(mesh_sizes, flash_calls):
    dense_config = small_config()
    host_params = initial_host_params(dense_config)
    host_batch = random_batch(np.random.default_rng(1), 8, 16, dense_config.model.vocab_size)
    loss, grads = loss_and_grads(dense_config, mesh_of(data=1), host_params, host_batch)
    # context_parallel="none": under sequence=2 the single-program flash path (tests/test_context_parallel.py
    # covers attention sharded along the sequence)
    flash_config = small_config(attention_impl="flash", attention_block=8, context_parallel="none")
    flash_config.mesh.update({"data": 1, **mesh_sizes})
    flash_loss, flash_grads = loss_and_grads(flash_config, mesh_of(**mesh_sizes), host_params, host_batch)
    assert flash_calls  # the flash path really ran
    np.testing.assert_allclose(flash_loss, loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), flash_grads, grads)


def test_hybrid_sliding_window_with_flash_equals_dense(flash_calls):
    config = load_recipe("plamo2_tiny").model
    config.attention_window = 6
    tokens = np.random.default_rng(2).integers(3, config.vocab_size, (2, 20)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[1, 9:] = 2
    positions = np.where(segments == 2, np.arange(20) - 9, np.arange(20))
    dense = Decoder(config, rngs=nnx.Rngs(0))
    flash_cfg = config.copy_and_resolve_references()
    flash_cfg.attention_impl, flash_cfg.attention_block = "flash", 8
    flash = Decoder(flash_cfg, rngs=nnx.Rngs(1))
    nnx.update(flash, nnx.state(dense))
    expected = dense(tokens, segments, positions)[0]
    assert not flash_calls
    np.testing.assert_allclose(flash(tokens, segments, positions)[0], expected, rtol=1e-5, atol=1e-5)
    assert flash_calls


def test_flash_backward_needs_a_fraction_of_the_dense_memory():
    """XLA's memory analysis of value-and-grad at 2,048 tokens: no [L, L] scores are kept."""
    length, heads, head_dim = 2048, 4, 32
    shapes = [jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)] * 3
    segments = jnp.ones((1, length), jnp.int32)

    def temp_bytes(attend):
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))
        return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    dense = temp_bytes(lambda q, k, v: dot_product_attention(q, k, v, attention_mask(segments)))
    flash = temp_bytes(lambda q, k, v: flash_attention(q, k, v, segments, 0, 256))
    scores = heads * length * length * 4
    assert flash < scores / 4 < dense / 4, (dense, flash, scores)  # measured: 10.3 MB vs 203 MB
