"""Chunked SSD and the causal conv against sequential references; document resets; the Mamba mixer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plamo_jax.models import ssm

# jit whole functions: one compile is far cheaper than op-by-op dispatch on a shared CPU
naive = jax.jit(ssm.ssd_naive)
chunked = jax.jit(ssm.ssd_chunked, static_argnames="chunk_size")


def _inputs(seed, batch=2, length=37, heads=3, head_dim=4, state_dim=5):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, length, heads)) - 1.0)
    A = -jnp.exp(jax.random.normal(keys[2], (heads,)))
    b = jax.random.normal(keys[3], (batch, length, state_dim))
    c = jax.random.normal(keys[4], (batch, length, state_dim))
    return x, dt, A, b, c


def _loop_reference(x, dt, A, b, c, segment_ids):
    """Plain numpy loop, independent of ssd_naive: reset the state where the segment id changes."""
    x, dt, A, b, c = (np.asarray(t, np.float64) for t in (x, dt, A, b, c))
    batch, length, heads, head_dim = x.shape
    y = np.zeros_like(x)
    for i in range(batch):
        h = np.zeros((heads, head_dim, b.shape[-1]))
        for t in range(length):
            if t > 0 and segment_ids[i, t] != segment_ids[i, t - 1]:
                h[:] = 0
            decay = np.exp(dt[i, t] * A)[:, None, None]
            h = decay * h + dt[i, t][:, None, None] * x[i, t][:, :, None] * b[i, t]
            y[i, t] = h @ c[i, t]
    return y


@pytest.mark.parametrize("chunk_size,length", [(8, 37), (16, 16), (5, 23), (64, 37), (1, 6)])
def test_chunked_equals_sequential(chunk_size, length):
    x, dt, A, b, c = _inputs(0, length=length)
    doc = ssm.document_index(jnp.zeros((2, length), jnp.int32))
    y_ref, state_ref = naive(x, dt, A, b, c, doc)
    y, state = chunked(x, dt, A, b, c, doc, chunk_size=chunk_size)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, state_ref, rtol=1e-5, atol=1e-5)


def test_naive_matches_numpy_loop_with_documents():
    x, dt, A, b, c = _inputs(1, length=20)
    segments = np.array([[1] * 7 + [2] * 9 + [3] * 4, [5] * 20])
    y, _ = naive(x, dt, A, b, c, ssm.document_index(jnp.asarray(segments)))
    np.testing.assert_allclose(y, _loop_reference(x, dt, A, b, c, segments), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 8, 32])
def test_chunked_resets_at_document_boundaries(chunk_size):
    x, dt, A, b, c = _inputs(2, length=29)
    # boundaries inside chunks, on chunk edges, and a one-token document
    segments = jnp.asarray([[1] * 8 + [2] * 5 + [3] + [4] * 15, [7] * 3 + [8] * 26])
    doc = ssm.document_index(segments)
    y, state = chunked(x, dt, A, b, c, doc, chunk_size=chunk_size)
    y_ref, state_ref = naive(x, dt, A, b, c, doc)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, state_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, _loop_reference(x, dt, A, b, c, np.asarray(segments)), rtol=1e-4, atol=1e-5)
    # the second document of row 1 alone gives the same outputs as inside the pack
    y_alone, _ = chunked(x[1:, 3:], dt[1:, 3:], A, b[1:, 3:], c[1:, 3:],
                                 ssm.document_index(segments[1:, 3:]), chunk_size=chunk_size)
    np.testing.assert_allclose(y[1:, 3:], y_alone, rtol=1e-5, atol=1e-5)


def test_initial_state_equals_running_the_prefix():
    x, dt, A, b, c = _inputs(3, length=30)
    doc = jnp.zeros((2, 30), jnp.int32)
    y_full, state_full = naive(x, dt, A, b, c, doc)
    _, state_prefix = chunked(x[:, :11], dt[:, :11], A, b[:, :11], c[:, :11], doc[:, :11], chunk_size=4)
    y_rest, state_rest = chunked(x[:, 11:], dt[:, 11:], A, b[:, 11:], c[:, 11:], doc[:, 11:],
                                         chunk_size=4, initial_state_BHPN=state_prefix)
    np.testing.assert_allclose(y_rest, y_full[:, 11:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state_rest, state_full, rtol=1e-5, atol=1e-5)


def test_chunked_gradients_match_sequential():
    x, dt, A, b, c = _inputs(4, length=19)
    doc = ssm.document_index(jnp.asarray([[1] * 10 + [2] * 9, [1] * 19]))

    def loss(fn, *args):
        y, state = fn(*args)
        return jnp.sum(jnp.sin(y)) + jnp.sum(state**2)

    grad_naive = jax.jit(jax.grad(lambda *a: loss(lambda *z: ssm.ssd_naive(*z, doc), *a),
                                  argnums=(0, 1, 2, 3, 4)))
    grad_chunked = jax.jit(jax.grad(lambda *a: loss(lambda *z: ssm.ssd_chunked(*z, doc, chunk_size=8), *a),
                                    argnums=(0, 1, 2, 3, 4)))
    for g, g_ref in zip(grad_chunked(x, dt, A, b, c), grad_naive(x, dt, A, b, c), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_causal_conv_matches_numpy_and_resets():
    key_x, key_w = jax.random.split(jax.random.key(5))
    x = jax.random.normal(key_x, (2, 12, 3, 2))
    w = jax.random.normal(key_w, (4, 3, 2))
    segments = np.array([[1] * 5 + [2] * 7, [3] * 12])
    conv = jax.jit(ssm.causal_conv)
    out = conv(x, w, jnp.asarray(segments))
    xn, wn = np.asarray(x), np.asarray(w)
    expected = np.zeros_like(xn)
    for i in range(2):
        for t in range(12):
            for k in range(4):
                s = t - 3 + k
                if s >= 0 and segments[i, s] == segments[i, t]:
                    expected[i, t] += wn[k] * xn[i, s]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # with a history, the first outputs read the cached inputs
    history = jax.random.normal(jax.random.key(6), (2, 3, 3, 2))
    out_h = conv(x, w, jnp.zeros((2, 12), jnp.int32), history, jnp.zeros((2, 3), jnp.int32))
    full = conv(jnp.concatenate([history, x], 1), w, jnp.zeros((2, 15), jnp.int32))
    np.testing.assert_allclose(out_h, full[:, 3:], rtol=1e-5, atol=1e-6)


def _mixer(chunk_size=8):
    return ssm.MambaMixer(d_model=16, num_heads=4, head_dim=4, state_dim=8, conv_width=4,
                          chunk_size=chunk_size, norm_eps=1e-6, init_std=0.2, out_init_std=0.2,
                          dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_mixer_init_values():
    mixer = _mixer()
    np.testing.assert_allclose(mixer.A_log[...], np.log(np.arange(1, 5)))
    dt = jax.nn.softplus(mixer.dt_bias[...])
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
    np.testing.assert_array_equal(mixer.D[...], 1.0)


@nnx.jit
def _forward(mixer, x, segment_ids):
    return mixer(x, segment_ids)


@nnx.jit
def _extend(mixer, x, cache):
    return mixer.extend(x, cache)


def test_mixer_extend_equals_full_forward():
    mixer = _mixer(chunk_size=4)
    x = jax.random.normal(jax.random.key(7), (2, 13, 16))
    full = _forward(mixer, x, jnp.zeros((2, 13), jnp.int32))
    cache = mixer.init_cache(2)
    prefix, cache = _extend(mixer, x[:, :6], cache)  # chunked path with a state
    outs = [prefix]
    for t in range(6, 13):  # one token at a time
        out, cache = _extend(mixer, x[:, t:t + 1], cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_mixer_packed_documents_equal_separate_runs():
    mixer = _mixer(chunk_size=4)
    x = jax.random.normal(jax.random.key(8), (1, 15, 16))
    packed = _forward(mixer, x, jnp.asarray([[1] * 9 + [2] * 6]))
    first = _forward(mixer, x[:, :9], jnp.ones((1, 9), jnp.int32))
    second = _forward(mixer, x[:, 9:], jnp.ones((1, 6), jnp.int32))
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), rtol=1e-5, atol=1e-5)
