"""The liveness walk of the memory estimator (estimate/liveness.py) against programs counted by hand,
and against XLA's own buffer assignment for a block's backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from plamo_jax.estimate import aot
from plamo_jax.estimate.liveness import peak_bytes

F32, BF16 = jnp.float32, jnp.bfloat16


def spec(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def peak(fn, *args, **options) -> int:
    return peak_bytes(jax.make_jaxpr(fn)(*args), **options)


def test_a_chain_of_matmuls_holds_one_intermediate_and_the_result():
    x, w1, w2 = spec(8, 16), spec(16, 32), spec(32, 4)
    # h = x @ w1 (8*32*4 = 1024 B) is live while h @ w2 (8*4*4 = 128 B) is written
    assert peak(lambda x, w1, w2: (x @ w1) @ w2, x, w1, w2) == 1024 + 128
    # with the inputs (512 + 2048 + 512 B) the peak is the first product, while x and w1 are still read
    assert peak(lambda x, w1, w2: (x @ w1) @ w2, x, w1, w2, count_inputs=True) == 512 + 2048 + 512 + 1024


def test_elementwise_chains_get_no_buffers_of_their_own():
    x = spec(64, 64)
    # exp, multiply and add are fused into the reduction: only its scalar is written
    assert peak(lambda x: jnp.sum(jnp.exp(x) * 2 + 1), x) == 4


def test_a_result_computed_by_a_fused_chain_is_written_after_its_source():
    x, w = spec(8, 16, dtype=BF16), spec(16, 32, dtype=BF16)
    # the bf16 product (8*32*2 = 512 B) is live while its fp32 cast (1024 B) is written
    assert peak(lambda x, w: (x @ w).astype(F32), x, w) == 512 + 1024
    assert peak(lambda x, w: (x @ w).astype(F32), x, w, keep_results=False) == 512 + 1024


def test_work_whose_result_nobody_reads_is_dropped():
    def discards_a_product(x, w):
        _ = x @ w  # as a custom derivative that computes autodiff's gradient and then its own
        return jnp.sum(x)

    jaxpr = jax.make_jaxpr(discards_a_product)(spec(64, 64), spec(64, 64))
    assert any(eqn.primitive.name == "dot_general" for eqn in jaxpr.eqns)  # traced, then dropped
    assert peak_bytes(jaxpr) == 4


def test_results_handed_on_are_not_held_together():
    x, w1, w2 = spec(8, 16), spec(16, 32), spec(16, 64)
    both = lambda x, w1, w2: (x @ w1, x @ w2)  # noqa: E731
    assert peak(both, x, w1, w2) == 8 * 32 * 4 + 8 * 64 * 4
    assert peak(both, x, w1, w2, keep_results=False) == 8 * 64 * 4


def test_each_call_of_a_jitted_function_gets_its_own_buffers():
    square = jax.jit(lambda a: a @ a.T)
    x = spec(8, 16)
    # two [8, 8] products (256 B each) are live together; their sum is written over one of them
    assert peak(lambda x: square(x) + square(x * 2), x) == 2 * 256


def test_a_loop_adds_its_body_peak_to_what_is_live_around_it():
    def loop(xs, w):
        def body(carry, row):
            return carry + jnp.sum(row @ w), None  # the [4, 32] product: 512 B inside the body

        total, _ = jax.lax.scan(body, jnp.zeros((), F32), xs)
        return total

    # the loop's result (4 B) and, inside the body, the product and the body's own sum (4 B)
    assert peak(loop, spec(10, 4, 16), spec(16, 32)) == 4 + 512 + 4


def checkpointed_mlp_backward():
    """A SwiGLU MLP's backward pass under full rematerialisation: (function, argument specs)."""
    tokens, width, hidden = 512, 256, 1024

    def mlp(params, x):
        gate, up, down = params
        return (jax.nn.silu(x @ gate) * (x @ up)) @ down

    checkpointed = jax.checkpoint(mlp, policy=jax.checkpoint_policies.nothing_saveable)

    def backward(params, x, cotangent):
        return jax.vjp(checkpointed, params, x)[1](cotangent)

    return backward, ((spec(width, hidden), spec(width, hidden), spec(hidden, width)), spec(tokens, width),
                      spec(tokens, width))


def compiled_temporaries_and_outputs(fn, args) -> int:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def test_a_block_backward_is_near_what_xla_cpu_allocates():
    """The independent reference: XLA's CPU backend compiles the same backward pass. It calls its GEMMs
    on operands in memory and copies some transposed, so it holds more than the walk (measured 0.68)."""
    backward, args = checkpointed_mlp_backward()
    walked = peak(backward, *args, matmul_operands_fused=False)
    xla = compiled_temporaries_and_outputs(backward, args)
    assert 0.6 * xla <= walked <= 1.4 * xla, (walked, xla)


def test_a_block_backward_is_near_what_the_tpu_compiler_allocates():
    """The TPU compiler fuses the elementwise producers into the matmuls and schedules the products
    tighter than program order (measured 1.34: the walk errs high)."""
    pytest.importorskip("libtpu", reason="the TPU compiler (libtpu, the tpu extra) is not installed")
    chip = aot.get_topology("v5p:2x2x1").devices[0]
    backward, args = checkpointed_mlp_backward()
    placed = jax.sharding.SingleDeviceSharding(chip)
    on_chip = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placed), args)
    walked = peak(backward, *args)
    xla = compiled_temporaries_and_outputs(backward, on_chip)
    assert 0.6 * xla <= walked <= 1.4 * xla, (walked, xla)


def test_a_chain_that_several_matmuls_read_is_written_out_once_on_tpu():
    x, w, g = spec(8, 16), spec(16, 32), spec(8, 32)
    # one reader: tanh(x @ w) * g is fused into the second product's operand; x @ w (1024 B) and the
    # [16, 32] product (2048 B) are live together
    assert peak(lambda x, w, g: x.T @ (jnp.tanh(x @ w) * g), x, w, g) == 1024 + 2048
    # two readers (an input's and a weight's gradient): the chain (1024 B) is written once, over x @ w,
    # which it read last, then both products ([8, 16]: 512 B, [16, 32]: 2048 B) read it
    both = lambda x, w, g: ((d := jnp.tanh(x @ w) * g) @ w.T, x.T @ d)
    assert peak(both, x, w, g) == 1024 + 512 + 2048
    # a GEMM library (CPU, GPU) writes out every operand chain anyway
    assert peak(both, x, w, g, matmul_operands_fused=False) == 1024 + 512 + 2048
