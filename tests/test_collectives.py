"""Collectives of a compiled program counted per step (estimate/aot.py): each op times the trip counts
of the loops around it, on programs whose counts are known by construction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from plamo_jax.estimate import aot


def compiled_text(fn, x) -> str:
    return jax.jit(fn).lower(x).compile().as_text()


def sharded_input(mesh):
    return jax.device_put(jnp.ones((2, 128), jnp.float32), NamedSharding(mesh, P("x")))


def test_a_collective_in_nested_loops_counts_once_per_iteration():
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])

    def inner_loop(carry, _):
        return carry + jax.lax.psum(carry, "x") * 0.5, None  # one all-reduce of [1, 128] fp32 (512 B)

    def outer_loop(carry, _):
        carry, _ = jax.lax.scan(inner_loop, carry, None, length=3)
        return carry, None

    def per_shard(x):
        out, _ = jax.lax.scan(outer_loop, x, None, length=5)
        return jax.lax.psum(out, "x")  # one more, outside the loops

    program = jax.shard_map(per_shard, mesh=mesh, in_specs=P("x"), out_specs=P())
    (all_reduce,) = aot.collectives(compiled_text(program, sharded_input(mesh)))
    assert all_reduce.kind == "all-reduce"
    assert (all_reduce.count, all_reduce.bytes) == (2, 1024)  # as written: the loop body once
    assert (all_reduce.per_step, all_reduce.per_step_bytes) == (5 * 3 + 1, (5 * 3 + 1) * 512)
    assert all_reduce.sent_bytes == all_reduce.per_step_bytes  # a ring all-reduce sends >= its size


def test_a_fragment_without_an_entry_counts_each_op_once():
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])

    def loop(carry, _):
        return carry + jax.lax.psum(carry, "x"), None

    def per_shard(x):
        return jax.lax.scan(loop, x, None, length=4)[0]

    text = compiled_text(jax.shard_map(per_shard, mesh=mesh, in_specs=P("x"), out_specs=P("x")),
                         sharded_input(mesh))
    (inside,) = aot.collectives(aot.inside_loops(text))
    assert (inside.count, inside.per_step) == (1, 1)
