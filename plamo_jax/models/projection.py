"""Weight matmuls (`x @ W` written as einsums) whose backward pass transposes the smaller operand.

A weight's gradient contracts the activation x [rows, in] with the cotangent g [rows, out] over the
rows (batch x length). JAX's autodiff emits it as `dot_general(g, x)` then a transpose of the small
result, and XLA's canonical dot then materialises the operand that supplies the result's leading
dimensions transposed, rows last: g there, x when the same gradient is written `einsum(x, g)` in
the weight's own [in, out] order. On CPU that copy is a strided loop over the whole operand
(measured: the copies of the MLP gate / up cotangents, [2048, 2048] per layer at batch 4 x 512,
were 1.8 s of a 125M model's 13.8 s step). `weight_einsum` keeps autodiff where the output is the
narrower side (down, k / v, o projections) and writes the gradient as `einsum(x, g)` where the
input is (gate, up, Mamba in_proj, the LM head), so the copy is of the smaller operand. For the LM
head the cotangent is the fp32 logits' gradient [rows, vocab]: XLA computed it a second time,
transposed, for the weight gradient. Where the weight lists its output features first (the tied
head's [vocab, embed] embedding), the gradient is formed x-features first and the small result is
transposed. Values and gradients are the same einsums, so the numerics match autodiff to rounding;
GPU and TPU GEMMs read transposed operands anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from plamo_jax.models import fp8


def _operands(subscripts: str) -> tuple[str, str, str]:
    inputs, output = subscripts.replace(" ", "").split("->")
    x_subscripts, w_subscripts = inputs.split(",")
    return x_subscripts, w_subscripts, output


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def weight_einsum(subscripts: str, x: jax.Array, weight: jax.Array, preferred_element_type=None) -> jax.Array:
    """einsum(subscripts, x, weight) for an activation x and a weight; gradients as autodiff's.

    preferred_element_type: the product's dtype when it differs from the operands' (jnp.einsum's).
    """
    return jnp.einsum(subscripts, x, weight, preferred_element_type=preferred_element_type)


def _weight_einsum_fwd(subscripts, x, weight, preferred_element_type):
    return jnp.einsum(subscripts, x, weight, preferred_element_type=preferred_element_type), (x, weight)


def _weight_einsum_bwd(subscripts, preferred_element_type, residuals, gradient):
    x, weight = residuals
    x_subscripts, w_subscripts, out_subscripts = _operands(subscripts)

    def product(x, weight):
        return jnp.einsum(subscripts, x, weight, preferred_element_type=preferred_element_type)

    if x.size >= gradient.size:  # the output is the narrower side: autodiff's gradients
        x_gradient, weight_gradient = jax.vjp(product, x, weight)[1](gradient)
        return x_gradient, weight_gradient.astype(weight.dtype)
    # more output than input features: transpose x, not the cotangent
    (x_gradient,) = jax.vjp(lambda x: product(x, weight), x)[1](gradient)
    x_first = "".join(sorted(w_subscripts, key=lambda axis: axis not in x_subscripts))
    weight_gradient = jnp.einsum(f"{x_subscripts},{out_subscripts}->{x_first}", x, gradient,
                                 preferred_element_type=preferred_element_type)
    weight_gradient = jnp.einsum(f"{x_first}->{w_subscripts}", weight_gradient)
    return x_gradient, weight_gradient.astype(weight.dtype)


weight_einsum.defvjp(_weight_einsum_fwd, _weight_einsum_bwd)


def projection(subscripts: str, x: jax.Array, weight: jax.Array, dtype, use_fp8: bool) -> jax.Array:
    """A weight matmul in the compute dtype, or in FP8 when the model's `fp8` is on."""
    if use_fp8:
        return fp8.fp8_einsum(subscripts, x, weight, dtype)
    return weight_einsum(subscripts, x.astype(dtype), weight.astype(dtype))
