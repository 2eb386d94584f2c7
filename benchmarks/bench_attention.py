"""Dense attention in one block and in causal query blocks, and flash (blockwise) attention: forward +
backward time and XLA temporaries for 512..8k tokens on this machine.

One packed row per batch element with causal masking. `dense` is `dot_product_attention` (one
[L, L] score matrix per head); `dense blocks` is `causal_dot_product_attention_with_max_logit` (what
dense attention runs on CPU: query blocks that read only the keys up to their last row); `flash` is
`flash_attention` with --block. The kernels run interleaved, --rounds rounds of --repeats calls each;
each figure is the median over rounds of a round's mean. The dense kernels are skipped where one
score matrix per head would exceed --dense-limit-gib. Asserts nothing.

    python benchmarks/bench_attention.py [--lengths 512,1024,2048,4096,8192] [--batch 1] [--heads 8]
        [--kv-heads 8] [--head-dim 128] [--block 512] [--rounds 3] [--repeats 2]

The 125.8M Llama layer of benchmarks/bench_peers.py: --lengths 512 --batch 4 --heads 12 --kv-heads 4
--head-dim 64.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from bench_moe import seconds_per_call  # the sibling script (benchmarks/ is on sys.path)

from plamo_jax.models.attention import causal_dot_product_attention_with_max_logit, dot_product_attention
from plamo_jax.models.flash_attention import flash_attention
from plamo_jax.models.masks import attention_mask


def compiled_gradient(attend, q, k, v, segments):
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, segments)), argnums=(0, 1, 2)))
    return grad.lower(q, k, v).compile()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense-limit-gib", type=float, default=4.0)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; batch {args.batch}, {args.heads} query / {args.kv_heads} "
          f"KV heads x {args.head_dim}, flash block {args.block}; seconds per forward + backward "
          f"(median of {args.rounds} interleaved rounds) and MiB of XLA temporaries")
    kernels = {
        "dense": lambda q, k, v, segments: dot_product_attention(q, k, v, attention_mask(segments)),
        "dense blocks": lambda q, k, v, segments: causal_dot_product_attention_with_max_logit(
            q, k, v, attention_mask(segments))[0],
        "flash": lambda q, k, v, segments: flash_attention(q, k, v, segments, 0, args.block),
    }
    print(f"{'tokens':>7} " + " ".join(f"{name + ' s':>15} {name + ' MiB':>17}" for name in kernels))
    rng = np.random.default_rng(0)
    for length in (int(x) for x in args.lengths.split(",")):
        q = jnp.asarray(rng.standard_normal((args.batch, length, args.heads, args.head_dim)), jnp.float32)
        kv_shape = (args.batch, length, args.kv_heads, args.head_dim)
        k, v = (jnp.asarray(rng.standard_normal(kv_shape), jnp.float32) for _ in range(2))
        segments = jnp.ones((args.batch, length), jnp.int32)
        dense_gib = args.batch * args.heads * length * length * 4 / 2**30
        names = [n for n in kernels if n == "flash" or dense_gib <= args.dense_limit_gib]
        compiled = {name: compiled_gradient(kernels[name], q, k, v, segments) for name in names}
        rounds = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                rounds[name].append(seconds_per_call(compiled[name], q, k, v, repeats=args.repeats))
        cells = []
        for name in kernels:
            if name in compiled:
                temporaries = compiled[name].memory_analysis().temp_size_in_bytes / 2**20
                cells.append(f"{statistics.median(rounds[name]):15.3f} {temporaries:17.1f}")
            else:
                cells.append(f"{'skipped':>15} {'':>17}")
        print(f"{length:7d} " + " ".join(cells))


if __name__ == "__main__":
    main()
