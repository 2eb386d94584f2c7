"""Training-step figures for the ~100M dense config on this machine.

Prints tokens/s, step time and peak host memory; XLA's counted FLOPs per step (compiled cost
analysis) against the model-FLOPs formula; and compile time of 4 vs 32 layers of the same width
(layers are scanned, so the two should be close).

    python benchmarks/bench_train.py [--batch 4] [--seq-len 512] [--steps 5] [--config configs/dense_100m.py]
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import numpy as np

from plamo_jax.configuration import load_recipe, mesh_rules
from plamo_jax.parallel.mesh import make_mesh
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import flops as flops_lib
from plamo_jax.train import state as state_lib
from plamo_jax.train.optimizer import make_optimizer


def synthetic_batch(batch: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, vocab, (batch, seq_len), dtype=np.int32),
        "target_ids": rng.integers(0, vocab, (batch, seq_len), dtype=np.int32),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }


def build_step(config):
    mesh = make_mesh(config.mesh)
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    return mesh, rules, setup, optimizer, state_lib.jit_train_step(config, setup, optimizer)


def counted_flops(config_path: str, batch_size: int, seq_len: int, batch) -> float:
    """XLA's FLOP count of the compiled step, with layers unrolled (XLA counts a loop body once)."""
    config = load_recipe(config_path)
    config.train.global_batch_size, config.train.seq_len = batch_size, seq_len
    config.model.scan_unroll = config.model.num_layers
    mesh, rules, setup, optimizer, step = build_step(config)
    with sharding_context(mesh, rules):
        cost = step.lower(state_lib.abstract_state(setup, optimizer), batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def compile_seconds(config, num_layers: int, batch) -> float:
    config.model.num_layers = num_layers
    mesh, rules, setup, optimizer, step = build_step(config)
    abstract = state_lib.abstract_state(setup, optimizer)
    with sharding_context(mesh, rules):
        start = time.perf_counter()
        step.lower(abstract, batch).compile()
    return time.perf_counter() - start


def measure_training(config_path: str, batch_size: int, seq_len: int, steps: int) -> dict:
    """Mean step time of the jitted train step after one warm-up step, on a synthetic batch."""
    config = load_recipe(config_path)
    config.train.global_batch_size, config.train.seq_len = batch_size, seq_len
    mesh, rules, setup, optimizer, step = build_step(config)
    batch = jax.device_put(
        synthetic_batch(batch_size, seq_len, config.model.vocab_size), state_lib.batch_sharding(mesh, rules)
    )
    state = state_lib.init_state(config.model, setup, optimizer, seed=0)
    with sharding_context(mesh, rules):
        state, metrics = step(state, batch)  # warm-up (includes compilation)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        step_seconds = (time.perf_counter() - start) / steps
    return {
        "config": config,
        "batch": batch,
        "step_seconds": step_seconds,
        "tokens_per_second": batch_size * seq_len / step_seconds,
        "parameters": state_lib.parameter_count(setup.abstract_params),
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

    measured = measure_training(args.config, args.batch, args.seq_len, args.steps)
    config, batch, step_seconds = measured["config"], measured["batch"], measured["step_seconds"]
    params = measured["parameters"]

    xla_flops = counted_flops(args.config, args.batch, args.seq_len, batch)
    tokens = args.batch * args.seq_len
    formula = flops_lib.train_flops_per_token(config.model, args.seq_len) * tokens
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
        f"ratio XLA / formula  {xla_flops / formula:10.3f}  (XLA also counts masked attention scores, "
        f"softmax, norms and optimizer arithmetic)"
    )

    small = load_recipe(args.config)
    small.train.global_batch_size, small.train.seq_len = args.batch, args.seq_len
    shallow = compile_seconds(small, 4, batch)
    deep = compile_seconds(small, 32, batch)
    print(f"compile time  4 layers {shallow:8.2f} s")
    print(
        f"compile time 32 layers {deep:8.2f} s   ratio {deep / shallow:.2f} "
        "(scan keeps depth out of compile time)"
    )


if __name__ == "__main__":
    main()
