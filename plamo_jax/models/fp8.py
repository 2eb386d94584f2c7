"""FP8 matmuls with per-tensor current scaling: E4M3 inputs and weights forward, E5M2 output gradients.

Each operand is scaled so its absolute maximum maps to the format's largest finite value, cast to
FP8 and back (quantize-dequantize). XLA on Hopper and newer GPUs rewrites `dequantize -> dot` into
an FP8 GEMM with the scales folded in; elsewhere (CPU, older GPUs) the same graph runs as a
higher-precision dot on FP8-rounded values, so the numerics can be tested anywhere. Scales come
from the tensor itself at each step (current scaling), so there is no amax history to carry in the
train state; the cost is one max-reduction per operand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FORWARD_DTYPE = jnp.float8_e4m3fn
GRADIENT_DTYPE = jnp.float8_e5m2


def quantize_dequantize(x: jax.Array, fp8_dtype) -> jax.Array:
    """x rounded to fp8_dtype under a per-tensor scale (amax -> the format's max), in x's dtype."""
    largest = jnp.finfo(fp8_dtype).max.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = jnp.where(amax > 0, largest / amax, 1.0)
    scaled = jnp.clip(x.astype(jnp.float32) * scale, -largest, largest)
    return (scaled.astype(fp8_dtype).astype(jnp.float32) / scale).astype(x.dtype)


@jax.custom_vjp
def _forward_operand(x: jax.Array) -> jax.Array:
    return quantize_dequantize(x, FORWARD_DTYPE)


def _forward_operand_fwd(x):
    return quantize_dequantize(x, FORWARD_DTYPE), None


def _forward_operand_bwd(_, gradient):
    return (gradient,)  # straight through: the rounding has no useful derivative


_forward_operand.defvjp(_forward_operand_fwd, _forward_operand_bwd)


@jax.custom_vjp
def _gradient_in_e5m2(y: jax.Array) -> jax.Array:
    return y


def _gradient_in_e5m2_fwd(y):
    return y, None


def _gradient_in_e5m2_bwd(_, gradient):
    return (quantize_dequantize(gradient, GRADIENT_DTYPE),)


_gradient_in_e5m2.defvjp(_gradient_in_e5m2_fwd, _gradient_in_e5m2_bwd)


def fp8_einsum(subscripts: str, x: jax.Array, weight: jax.Array, dtype) -> jax.Array:
    """einsum(x, weight) with both operands in E4M3 and the incoming gradient in E5M2."""
    out = jnp.einsum(
        subscripts,
        _forward_operand(x.astype(dtype)),
        _forward_operand(weight.astype(dtype)),
        preferred_element_type=jnp.float32,
    )
    return _gradient_in_e5m2(out).astype(dtype)
