"""Training-step figures for the ~100M dense config on this machine.

Prints tokens/s, step time and peak host memory; XLA's counted FLOPs per step (compiled cost
analysis) against the model-FLOPs formula; and compile time of 4 vs 32 layers of the same width
(layers are scanned, so the two should be close). Runs as launch/train.py does on a CPU machine:
restarted with its host memory set up for training (plamo_jax/host_memory.py; PLAMO_HOST_MEMORY=off).

    python benchmarks/bench_train.py [--batch 4] [--seq-len 512] [--steps 5] [--config configs/dense_100m.py]
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import numpy as np

from plamo_jax import host_memory
from plamo_jax.configuration import load_recipe
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import state as state_lib
from plamo_jax.train.run import Run, build_run


def synthetic_batch(batch: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, vocab, (batch, seq_len), dtype=np.int32),
        "target_ids": rng.integers(0, vocab, (batch, seq_len), dtype=np.int32),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }


def counted_flops(config_path: str, batch_size: int, seq_len: int) -> float:
    """XLA's FLOP count of the compiled step, with layers unrolled (XLA counts a loop body once)."""
    config = load_recipe(config_path)
    config.train.global_batch_size, config.train.seq_len = batch_size, seq_len
    config.model.scan_unroll = config.model.num_layers
    run = build_run(config)
    with sharding_context(run.mesh, run.rules):
        cost = run.step.lower(run.abstract_state(), run.abstract_batch(), None).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def compile_seconds(config, num_layers: int) -> float:
    config.model.num_layers = num_layers
    run = build_run(config)
    with sharding_context(run.mesh, run.rules):
        start = time.perf_counter()
        run.step.lower(run.abstract_state(), run.abstract_batch(), None).compile()
    return time.perf_counter() - start


def timed_steps(run: Run, steps: int) -> tuple[dict, dict, float]:
    """(first metrics, final state, mean seconds per step after one warm-up step) on a synthetic batch."""
    t = run.config.train
    batch = jax.device_put(synthetic_batch(t.global_batch_size, t.seq_len, run.config.model.vocab_size),
                           run.batch_sharding)
    state = run.fresh_state()
    with sharding_context(run.mesh, run.rules):
        state, metrics = run.step(state, batch, None)  # warm-up (includes compilation)
        first = jax.device_get(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = run.step(state, batch, None)
        jax.block_until_ready(metrics)
    return first, state, (time.perf_counter() - start) / steps


def measure_training(config_path: str, batch_size: int, seq_len: int, steps: int) -> dict:
    """Mean step time of the jitted train step after one warm-up step, on a synthetic batch."""
    config = load_recipe(config_path)
    config.train.global_batch_size, config.train.seq_len = batch_size, seq_len
    run = build_run(config)
    _, _, step_seconds = timed_steps(run, steps)
    return {
        "run": run,
        "step_seconds": step_seconds,
        "tokens_per_second": batch_size * seq_len / step_seconds,
        "parameters": state_lib.parameter_count(run.setup.abstract_params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/dense_100m.py")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    host_memory.reexec_for_cpu_training()  # measured as launch/train.py runs on a CPU machine

    measured = measure_training(args.config, args.batch, args.seq_len, args.steps)
    run, step_seconds, params = measured["run"], measured["step_seconds"], measured["parameters"]

    xla_flops = counted_flops(args.config, args.batch, args.seq_len)
    tokens = args.batch * args.seq_len
    formula = run.flops_per_token * run.tokens_per_step
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"config {args.config}: {params / 1e6:.1f}M parameters, batch {args.batch} x {args.seq_len} tokens, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
    )
    print(f"step time            {step_seconds * 1e3:10.1f} ms")
    print(f"tokens/s             {tokens / step_seconds:10.1f}")
    print(f"achieved FLOP/s      {formula / step_seconds / 1e9:10.2f} GFLOP/s (model FLOPs)")
    print(f"peak host memory     {peak_rss_gib:10.2f} GiB (max RSS)")
    print(f"FLOPs/step formula   {formula:14.4e}")
    print(f"FLOPs/step XLA       {xla_flops:14.4e}")
    print(
        f"ratio XLA / formula  {xla_flops / formula:10.3f}  (XLA also counts the masked scores inside "
        f"dense attention's diagonal query blocks, softmax, norms and optimizer arithmetic)"
    )

    small = load_recipe(args.config)
    small.train.global_batch_size, small.train.seq_len = args.batch, args.seq_len
    shallow = compile_seconds(small, 4)
    deep = compile_seconds(small, 32)
    print(f"compile time  4 layers {shallow:8.2f} s")
    print(
        f"compile time 32 layers {deep:8.2f} s   ratio {deep / shallow:.2f} "
        "(scan keeps depth out of compile time)"
    )


if __name__ == "__main__":
    main()
