"""weight_einsum: the projections' values and gradients equal autodiff of the plain einsum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plamo_jax.models.projection import projection, weight_einsum

# every weight matmul the families use: (subscripts, x shape, weight shape)
PROJECTIONS = [
    ("bld,df->blf", (2, 6, 8), (8, 20)),  # gate / up: the cotangent is wider than x
    ("blf,fd->bld", (2, 6, 20), (20, 8)),  # down: x is wider than the cotangent
    ("bld,dhk->blhk", (2, 6, 8), (8, 3, 4)),  # q / k / v
    ("blhk,hkd->bld", (2, 6, 3, 4), (3, 4, 8)),  # o
    ("bld,dhkp->blhkp", (2, 6, 8), (8, 2, 3, 4)),  # Mamba in_proj
    ("blhp,hpd->bld", (2, 6, 2, 4), (2, 4, 8)),  # Mamba out_proj
]


@pytest.mark.parametrize("subscripts,x_shape,w_shape", PROJECTIONS)
def test_values_and_gradients_equal_autodiff(subscripts, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32))
    ours, ours_vjp = jax.vjp(lambda x, w: weight_einsum(subscripts, x, w), x, w)
    reference, reference_vjp = jax.vjp(lambda x, w: jnp.einsum(subscripts, x, w), x, w)
    cotangent = jnp.asarray(rng.standard_normal(reference.shape, np.float32))
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
    for got, want in zip(ours_vjp(cotangent), reference_vjp(cotangent), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and against numpy's einsum of the closed form dW = sum over rows of x (outer) g
    x_subscripts, rest = subscripts.split(",")
    w_subscripts, out_subscripts = rest.split("->")
    closed_form = np.einsum(f"{x_subscripts},{out_subscripts}->{w_subscripts}", np.asarray(x),
                            np.asarray(cotangent))
    np.testing.assert_allclose(ours_vjp(cotangent)[1], closed_form, rtol=1e-5, atol=1e-5)


def test_projection_casts_to_the_compute_dtype_and_the_gradient_back_to_the_weight():
    x = jnp.ones((1, 2, 4), jnp.float32)
    w = jnp.full((4, 3), 0.5, jnp.float32)
    out, vjp = jax.vjp(lambda w: projection("bld,df->blf", x, w, jnp.bfloat16, False), w)
    assert out.dtype == jnp.bfloat16
    (gradient,) = vjp(jnp.ones_like(out))
    assert gradient.dtype == jnp.float32
    np.testing.assert_allclose(gradient, np.full((4, 3), 2.0))
