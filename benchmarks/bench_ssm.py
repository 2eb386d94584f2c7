"""SSD (chunked Mamba2 scan) vs the sequential scan vs causal attention of the same width.

For each sequence length prints wall time (median of --repeats after a warm-up) and the FLOPs XLA
counts for the compiled function (`cost_analysis()`), forward only. XLA counts the body of a while loop
once, so the sequential scan's figure is XLA's count times the number of steps (the length). Example:
    .venv/bin/python benchmarks/bench_ssm.py --lengths 1024,2048,4096,8192,16384
On CPU, lower --heads/--head-dim or cap the slow baselines with --max-sequential / --max-attention.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from plamo_jax.models.attention import dot_product_attention
from plamo_jax.models.masks import attention_mask
from plamo_jax.models.ssm import document_index, ssd_chunked, ssd_naive


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--state-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-sequential", type=int, default=1 << 30, help="skip the scan above this length")
    parser.add_argument("--max-attention", type=int, default=1 << 30, help="skip attention above this length")
    return parser.parse_args()


def flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX returns one dict per computation
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def measure(fn, args, repeats: int) -> tuple[float, float]:
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), flops_of(compiled)


def main() -> None:
    args = parse_args()
    b, h, p, n = args.batch, args.heads, args.head_dim, args.state_dim
    print(f"device={jax.devices()[0].device_kind} batch={b} heads={h} head_dim={p} state={n} "
          f"chunk={args.chunk_size} (width {h * p})")
    print(f"{'length':>7} | {'SSD ms':>9} {'SSD GFLOP':>10} | {'scan ms':>9} {'scan GFLOP':>10} | "
          f"{'attn ms':>9} {'attn GFLOP':>10}")

    def ssd(x, dt, A, B, C, doc):
        return ssd_chunked(x, dt, A, B, C, doc, chunk_size=args.chunk_size)[0]

    def scan(x, dt, A, B, C, doc):
        return ssd_naive(x, dt, A, B, C, doc)[0]

    def attention(q, k, v, segment_ids):
        return dot_product_attention(q, k, v, attention_mask(segment_ids))

    for length in (int(s) for s in args.lengths.split(",")):
        keys = jax.random.split(jax.random.key(length), 6)
        x = jax.random.normal(keys[0], (b, length, h, p))
        dt = jax.nn.softplus(jax.random.normal(keys[1], (b, length, h)) - 2.0)
        A = -jnp.exp(jax.random.normal(keys[2], (h,)))
        B = jax.random.normal(keys[3], (b, length, n))
        C = jax.random.normal(keys[4], (b, length, n))
        segments = jnp.ones((b, length), jnp.int32)
        doc = document_index(segments)
        row = [f"{length:>7}"]
        for fn, fn_args, limit, loop_steps in ((ssd, (x, dt, A, B, C, doc), 1 << 62, 1),
                                               (scan, (x, dt, A, B, C, doc), args.max_sequential, length),
                                               (attention, (x, x, x, segments), args.max_attention, 1)):
            if length > limit:
                row.append(f"{'-':>9} {'-':>10}")
                continue
            seconds, flops = measure(fn, fn_args, args.repeats)
            flops *= loop_steps
            row.append(f"{seconds * 1e3:9.2f} {flops / 1e9:10.3f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
