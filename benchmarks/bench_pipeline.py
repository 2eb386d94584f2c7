"""Pipeline parallelism on 8 simulated CPU devices: the bubble, measured next to (S-1)/(R*M+S-1).

One dense model (8 blocks, fp32, remat none), one full train step (forward, backward, AdamW) of the
same global batch, compiled with `train.run.build_run`:

- the baseline without a pipeline: mesh data=8;
- pipelines mesh stage=S x data=8/S, for several microbatch counts M and repeats R (R > 1: circular).

Per row: the median step time of --steps runs after a warm-up, the ratio to the baseline, and the
measured bubble fraction 1 - t(baseline) / t(pipeline) next to the schedule's (S-1)/(R*M+S-1).

Why that ratio measures the bubble here: the 8 devices are simulated on this machine's CPU cores, so a
step takes about the total work of all devices divided by the cores. This SPMD pipeline runs every stage
at every iteration (bubble iterations compute on placeholders and are discarded), so its total work is
(R*M+S-1)/(R*M) times the baseline's, and 1 - t_base / t_pipe is the share of that work that is bubble.
On real accelerators the bubble is idle time instead of wasted work; the fraction is the same. The
remaining gap is the pipeline's own overhead (the stream updates, the circular schedule's parameter
regathering, smaller matrix products per microbatch). On a shared machine the times are noisy.

    python benchmarks/bench_pipeline.py [--steps 3] [--batch 32] [--seq-len 128] [--d-model 256]
        [--cases 4x4x1,4x8x1,4x16x1,4x4x2,4x8x2,2x2x1,2x8x1]   # stages x microbatches x repeats

Prints figures; asserts nothing. The defaults take ~4 minutes on a 2-core machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from plamo_jax.configuration import default_config  # noqa: E402
from plamo_jax.parallel.pipeline import PipelinePlan  # noqa: E402
from plamo_jax.parallel.rules import sharding_context  # noqa: E402
from plamo_jax.train.run import build_run  # noqa: E402


def make_config(args, stages: int, microbatches: int, repeats: int):
    config = default_config()
    m = config.model
    m.vocab_size, m.d_model, m.num_layers = 1024, args.d_model, 8
    m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 4, 4, args.d_model // 4, 4 * args.d_model
    m.pipeline_schedule = "circular" if repeats > 1 else "gpipe"
    m.pipeline_repeats, m.pipeline_microbatches = repeats, microbatches
    config.mesh.update(stage=stages, data=8 // stages)
    config.train.global_batch_size, config.train.seq_len = args.batch, args.seq_len
    config.train.output_dir = "/tmp/bench_pipeline"
    config.checkpoint.enabled = False
    return config


def step_seconds(config, steps: int) -> float:
    run = build_run(config, jax.devices())
    rng = np.random.default_rng(0)
    shape = (config.train.global_batch_size, config.train.seq_len)
    host = {"input_ids": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
            "target_ids": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
            "loss_mask": np.ones(shape, np.float32)}
    batch = jax.device_put({key: host[key] for key in run.objective.batch_keys}, run.batch_sharding)
    with sharding_context(run.mesh, run.rules):
        state = run.fresh_state()
        state, metrics = run.step(state, batch, None)  # compile + warm-up
        jax.block_until_ready(metrics["loss"])
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = run.step(state, batch, None)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--cases", default="4x4x1,4x8x1,4x16x1,4x4x2,4x8x2,2x2x1,2x8x1")
    args = parser.parse_args()
    cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    print(f"dense, 8 blocks, d_model {args.d_model}, batch {args.batch} x {args.seq_len} tokens, fp32, "
          f"{jax.device_count()} simulated devices on {os.cpu_count()} cores; median of {args.steps} steps")
    base = step_seconds(make_config(args, 1, 0, 1), args.steps)
    print(f"{'mesh':>16} {'schedule':>9} {'M':>3} {'R':>2} {'step s':>8} {'vs base':>8} "
          f"{'bubble measured':>16} {'(S-1)/(RM+S-1)':>15}")
    print(f"{'data=8':>16} {'-':>9} {'-':>3} {'-':>2} {base:8.3f} {1.0:8.2f} {'-':>16} {'-':>15}")
    for stages, microbatches, repeats in cases:
        seconds = step_seconds(make_config(args, stages, microbatches, repeats), args.steps)
        theory = PipelinePlan(stages, microbatches, repeats, 8 // (stages * repeats)).bubble_fraction
        mesh = f"stage={stages},data={8 // stages}"
        schedule = "circular" if repeats > 1 else "gpipe"
        print(f"{mesh:>16} {schedule:>9} {microbatches:>3} {repeats:>2} {seconds:8.3f} {seconds / base:8.2f} "
              f"{1 - base / seconds:16.3f} {theory:15.3f}")


if __name__ == "__main__":
    main()
