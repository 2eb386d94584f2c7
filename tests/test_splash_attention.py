"""Pallas TPU splash attention == our dense attention (Pallas interpret mode on CPU), and it compiles
for a TPU chip (with libtpu) as Mosaic kernels for the forward, dq and dk/dv passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from plamo_jax.estimate import aot
from plamo_jax.models.attention import dot_product_attention
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
