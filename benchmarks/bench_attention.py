"""Dense vs flash (blockwise) attention, forward + backward, for 1k..8k tokens on this machine.

Prints, per length, the step time and XLA's temporary memory of value-and-grad for both paths and
their ratios (one packed row with causal masking; the dense path is skipped where its scores alone
would exceed --dense-limit-gib).

    python benchmarks/bench_attention.py [--lengths 1024,2048,4096,8192] [--heads 8] [--head-dim 128]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from plamo_jax.models.attention import dot_product_attention
from plamo_jax.models.flash_attention import flash_attention
from plamo_jax.models.masks import attention_mask


def measure(attend, length: int, heads: int, head_dim: int, repeats: int) -> tuple[float, int]:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, length, heads, head_dim)), jnp.float32) for _ in range(3))
    segments = jnp.ones((1, length), jnp.int32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, segments)), argnums=(0, 1, 2)))
    compiled = grad.lower(q, k, v).compile()
    jax.block_until_ready(compiled(q, k, v))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compiled(q, k, v))
    return (time.perf_counter() - start) / repeats, compiled.memory_analysis().temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense-limit-gib", type=float, default=4.0)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; heads {args.heads} x {args.head_dim}, "
          f"flash block {args.block}")
    print(f"{'tokens':>7} {'dense s':>9} {'dense MiB':>10} {'flash s':>9} {'flash MiB':>10} "
          f"{'time ratio':>10} {'memory ratio':>12}")

    def dense(q, k, v, segments):
        return dot_product_attention(q, k, v, attention_mask(segments))

    def flash(q, k, v, segments):
        return flash_attention(q, k, v, segments, 0, args.block)

    for length in (int(x) for x in args.lengths.split(",")):
        flash_seconds, flash_bytes = measure(flash, length, args.heads, args.head_dim, args.repeats)
        scores_gib = args.heads * length * length * 4 / 2**30
        if scores_gib <= args.dense_limit_gib:
            dense_seconds, dense_bytes = measure(dense, length, args.heads, args.head_dim, args.repeats)
            print(f"{length:7d} {dense_seconds:9.3f} {dense_bytes / 2**20:10.1f} {flash_seconds:9.3f} "
                  f"{flash_bytes / 2**20:10.1f} {flash_seconds / dense_seconds:10.2f} "
                  f"{flash_bytes / dense_bytes:12.3f}")
        else:
            print(f"{length:7d} {'skipped':>9} {'':>10} {flash_seconds:9.3f} {flash_bytes / 2**20:10.1f}")


if __name__ == "__main__":
    main()
