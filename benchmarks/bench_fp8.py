"""FP8 vs the compute dtype: train-step time and the loss/gradient difference, in one run.

Both steps start from the same parameters and batch. On Hopper-class GPUs XLA turns the
quantize-dequantize-dot pattern into FP8 GEMMs (the speed-up is the point); elsewhere FP8 is
emulated and slower, and the figures only show its overhead and numerics.

    python benchmarks/bench_fp8.py [--config configs/dense_100m.py] [--batch 4] [--seq-len 512] [--steps 3]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from bench_train import timed_steps  # the sibling script (benchmarks/ is on sys.path)

from plamo_jax.configuration import load_recipe
from plamo_jax.train.run import build_run


def measure(config_path: str, fp8: bool, batch_size: int, seq_len: int, steps: int, dtype: str) -> dict:
    config = load_recipe(config_path)
    config.model.fp8, config.model.dtype = fp8, dtype
    config.train.global_batch_size, config.train.seq_len = batch_size, seq_len
    run = build_run(config)
    initial_params = jax.device_get(run.fresh_state()["params"])  # the seeded start timed_steps uses
    first, state, seconds = timed_steps(run, steps)
    # The first step's learning rate is 0 under warm-up: compare where all the steps took the parameters.
    update = jax.tree.map(lambda new, old: np.asarray(new, np.float64) - old, jax.device_get(state["params"]),
                          initial_params)
    return {"seconds": seconds, "tokens_per_second": batch_size * seq_len / seconds,
            "loss": float(first["loss"]), "grad_norm": float(first["grad_norm"]), "update": update}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/dense_100m.py")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the baseline and FP8 outputs")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), {jax.device_count()} device(s)")
    results = {}
    for fp8 in (False, True):
        results[fp8] = measure(args.config, fp8, args.batch, args.seq_len, args.steps, args.dtype)
        r = results[fp8]
        name = "fp8" if fp8 else args.dtype
        print(f"{name:>8}: step {r['seconds']:.3f} s, {r['tokens_per_second']:,.0f} tokens/s, "
              f"first loss {r['loss']:.5f}, grad norm {r['grad_norm']:.4f}")
    base, fp8 = results[False], results[True]
    cosine = optax.tree.vdot(fp8["update"], base["update"]) / (
        optax.tree.norm(fp8["update"]) * optax.tree.norm(base["update"]))
    print(f"fp8 / {args.dtype} step time: {fp8['seconds'] / base['seconds']:.2f}x; "
          f"first-step loss difference {abs(fp8['loss'] - base['loss']) / base['loss']:.2%}; "
          f"cosine of the parameter changes after {args.steps + 1} steps {float(cosine):.4f}")


if __name__ == "__main__":
    main()
