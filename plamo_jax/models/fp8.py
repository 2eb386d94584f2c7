"""FP8 matmuls with per-tensor current scaling: E4M3 inputs and weights forward, E5M2 output gradients.

Each operand is scaled so its absolute maximum maps into the format's range, cast to FP8 and back
(quantize-dequantize). XLA on Hopper and newer GPUs rewrites `dequantize -> dot` into a cuBLASLt FP8
GEMM (`__cublas$lt$matmul$f8`) with the scales folded in; elsewhere (CPU, older GPUs) the same graph
runs as a higher-precision dot on FP8-rounded values, so the numerics can be tested anywhere. Scales
come from the tensor itself at each step (current scaling), so there is no amax history to carry in
the train state; the cost is one max-reduction per operand.

The shape of the graph is what XLA's rewriter matches (xla/service/gpu/transforms/gemm_rewriter.cc):
each dot operand must be `convert(fp8) * broadcast(scalar)` (or `/`), followed only by layout ops
(reshape, transpose, bitcast, copy...), never by another convert. So the dequantization happens in
the dot's own input dtype, and the dot keeps that dtype for its output (cuBLAS accumulates in fp32
anyway). Scales are powers of two: then the inverse scale is exact in bfloat16, and dequantizing in
bfloat16 loses nothing against fp32 (E4M3 and E5M2 values have fewer mantissa bits than bfloat16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FORWARD_DTYPE = jnp.float8_e4m3fn
GRADIENT_DTYPE = jnp.float8_e5m2


def quantize(x: jax.Array, fp8_dtype) -> tuple[jax.Array, jax.Array]:
    """(x in fp8_dtype under a per-tensor power-of-two scale, the inverse scale as an fp32 scalar).

    The scale is the largest power of two that keeps amax(|x|) within the format's finite range.
    """
    largest = jnp.finfo(fp8_dtype).max.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = jnp.exp2(jnp.floor(jnp.log2(jnp.where(amax > 0, largest / amax, 1.0))))
    scaled = jnp.clip(x.astype(jnp.float32) * scale, -largest, largest)
    return scaled.astype(fp8_dtype), 1.0 / scale


def dequantize(q: jax.Array, inverse_scale: jax.Array, dtype) -> jax.Array:
    """convert(q) * inverse_scale in `dtype`: the operand pattern XLA folds into an FP8 GEMM."""
    return q.astype(dtype) * inverse_scale.astype(dtype)


def quantize_dequantize(x: jax.Array, fp8_dtype) -> jax.Array:
    """x rounded to fp8_dtype under a per-tensor power-of-two scale, in x's dtype."""
    return dequantize(*quantize(x, fp8_dtype), x.dtype)


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
    """einsum(x, weight) in `dtype` with both operands in E4M3 and the incoming gradient in E5M2.

    No preferred fp32 output: a wider output type would make the backward pass's dots mix dtypes, and
    the converts JAX then inserts between dequantization and dot hide the pattern from XLA.
    """
    out = jnp.einsum(subscripts, _forward_operand(x.astype(dtype)), _forward_operand(weight.astype(dtype)))
    return _gradient_in_e5m2(out)
