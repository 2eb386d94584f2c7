"""Pallas TPU splash attention == our dense attention (Pallas interpret mode on CPU), kernel and whole
model step under a mesh; auto picks it on TPU; and it compiles for a TPU chip (with libtpu) as Mosaic
kernels for the forward, dq and dk/dv passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import initial_host_params, loss_and_grads, mesh_of, random_batch, small_config
from jax.sharding import SingleDeviceSharding

from plamo_jax.errors import ConfigError
from plamo_jax.estimate import aot
from plamo_jax.models import kernels
from plamo_jax.models.attention import dot_product_attention, resolve_attention_impl
from plamo_jax.models.masks import attention_mask
from plamo_jax.models.splash_attention import splash_attention

# fp32 throughout; splash's online softmax sums in a different order than the dense softmax.
VALUE_TOL, GRAD_TOL = 2e-5, 1e-4


def inputs(heads: int, kv_heads: int, length: int = 256, head_dim: int = 128, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((2, length, n, head_dim)), jnp.float32)
               for n in (heads, kv_heads, kv_heads))
    # row 0: one document; row 1: three packed documents (boundaries off the 128-token blocks)
    segments = np.ones((2, length), np.int32)
    segments[1, 90:] = 2
    segments[1, 200:] = 3
    return q, k, v, jnp.asarray(segments)


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 2, 0), (4, 2, 64), (4, 4, 0), (4, 1, 100)],
                         ids=["gqa causal", "gqa window 64", "mha causal", "mqa window 100"])
def test_splash_equals_dense_attention_in_values_and_gradients(heads, kv_heads, window):
    q, k, v, segments = inputs(heads, kv_heads)
    weights = jnp.cos(jnp.arange(q.size).reshape(q.shape) * 0.01)  # a loss that weighs every output

    def splash_fn(q, k, v):
        return splash_attention(q, k, v, segments, window, interpret=True)

    def dense_fn(q, k, v):
        return dot_product_attention(q, k, v, attention_mask(segments, window))

    np.testing.assert_allclose(splash_fn(q, k, v), dense_fn(q, k, v), atol=VALUE_TOL)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, k, v)
             for f in (splash_fn, dense_fn)]
    for name, ours, theirs in zip(("dq", "dk", "dv"), *grads, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=GRAD_TOL, err_msg=name)


def test_the_window_and_the_segments_are_applied():
    q, k, v, segments = inputs(4, 2)
    windowed = splash_attention(q, k, v, segments, 64, interpret=True)
    causal = dot_product_attention(q, k, v, attention_mask(segments))
    assert float(jnp.max(jnp.abs(windowed - causal))) > 1e-2
    one_document = jnp.ones_like(segments)
    unpacked = splash_attention(q, k, v, one_document, interpret=True)[1]
    packed = splash_attention(q, k, v, segments, interpret=True)[1]
    assert float(jnp.max(jnp.abs(unpacked - packed))) > 1e-2


def test_splash_compiles_for_a_tpu_chip():
    pytest.importorskip("libtpu", reason="the TPU compiler (libtpu, the tpu extra) is not installed")

    placed = SingleDeviceSharding(aot.get_topology("v5p:2x2x1").devices[0])
    q, k, v = (jax.ShapeDtypeStruct((2, 512, n, 128), jnp.bfloat16, sharding=placed) for n in (8, 2, 2))
    segments = jax.ShapeDtypeStruct((2, 512), jnp.int32, sharding=placed)

    def loss(q, k, v, segments):
        return jnp.sum(splash_attention(q, k, v, segments, 128).astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, segments).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') >= 3  # forward, dq, dk/dv kernels


def test_a_model_step_with_splash_on_eight_devices_equals_dense_attention():
    """model.attention_impl=splash (Pallas interpret mode) under a data x fsdp x tensor mesh of 8 simulated
    devices, packed documents: the loss and every gradient equal the dense model's on one device."""
    config = small_config(attention_impl="splash", num_heads=4, num_kv_heads=2, head_dim=128, d_model=64)
    config.train.seq_len = 128
    host_params = initial_host_params(config)
    batch = random_batch(np.random.default_rng(0), 8, 128, config.model.vocab_size)
    with kernels.kernels_for("tpu"), kernels.pallas_interpret():
        loss, grads = loss_and_grads(config, mesh_of(data=2, fsdp=2, tensor=2), host_params, batch)
    dense = small_config(attention_impl="dense", num_heads=4, num_kv_heads=2, head_dim=128, d_model=64)
    dense.train.seq_len = 128
    want_loss, want_grads = loss_and_grads(dense, mesh_of(jax.devices()[:1]), host_params, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_auto_picks_splash_on_tpu_and_explicit_splash_elsewhere_is_a_config_error():
    with kernels.kernels_for("tpu"):
        assert resolve_attention_impl("auto", jnp.bfloat16, 128, 4096, 512) == "splash"
        assert resolve_attention_impl("auto", jnp.bfloat16, 128, 1000, 512) == "dense"  # 1000 % 512
        with pytest.raises(ConfigError, match="multiple of model.attention_block"):
            resolve_attention_impl("splash", jnp.float32, 128, 1000, 512)
    with kernels.kernels_for("cpu"), pytest.raises(ConfigError, match="needs a TPU, tracing for cpu"):
        resolve_attention_impl("splash", jnp.float32, 128, 512, 512)
