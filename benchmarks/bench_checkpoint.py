"""Checkpoint figures: save blocking time per step, save/restore throughput, conversion peak host memory.

    python benchmarks/bench_checkpoint.py [--d-model 768 --layers 8 --vocab 32768] [--out /tmp/bench_ckpt]

The model (default ~100M parameters, ~400 MB of fp32 parameters, ~1.2 GB of train state with AdamW) is
built on all local devices with FSDP. Conversions run as separate processes so each one's peak RSS is its own;
on a CPU backend the device arrays live in host memory, so from-hf's peak includes the whole model.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plamo_jax.configuration import default_config, mesh_rules  # noqa: E402
from plamo_jax.parallel.mesh import make_mesh  # noqa: E402
from plamo_jax.train import checkpoint as ckpt  # noqa: E402
from plamo_jax.train import state as state_lib  # noqa: E402
from plamo_jax.train.optimizer import make_optimizer  # noqa: E402


def directory_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def tree_mb(tree) -> float:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree)) / 2**20


def build_config(args):
    config = default_config()
    m = config.model
    m.vocab_size, m.d_model, m.num_layers, m.mlp_dim = args.vocab, args.d_model, args.layers, 4 * args.d_model
    m.num_heads, m.num_kv_heads, m.head_dim = args.d_model // 64, max(1, args.d_model // 256), 64
    m.tie_embeddings, m.qk_norm = False, False
    config.mesh.data, config.mesh.fsdp = 1, -1
    return config


def bench_save_and_restore(config, out: Path, saves: int) -> None:
    mesh = make_mesh(config.mesh)
    setup = state_lib.setup_model(config.model, mesh, mesh_rules(config))
    optimizer = make_optimizer(config.optimizer, 1000)
    state = state_lib.init_state(config.model, setup, optimizer, seed=0)
    state_mb = tree_mb(state)
    count = state_lib.parameter_count(setup.abstract_params)
    print(f"train state: {state_mb:.0f} MiB ({count:,} parameters) "
          f"on {jax.device_count()} {jax.devices()[0].platform} device(s)")

    # A stand-in step that touches every leaf (so a save overlaps device work) and fills the optimizer
    # moments with parameter-like values (zeros would compress and flatter the throughput).
    @jax.jit
    def step_fn(state):
        def touch(x):
            return x * 1.0001 + 1e-3 if jnp.issubdtype(x.dtype, jnp.floating) else x

        opt_state = optax.tree_map_params(optimizer, lambda m, p: m + p, state["opt_state"], state["params"],
                                          transform_non_params=lambda x: x)
        return jax.tree.map(touch, {**state, "opt_state": opt_state})

    state = jax.block_until_ready(step_fn(state))
    plain = []
    for _ in range(3):
        start = time.perf_counter()
        state = jax.block_until_ready(step_fn(state))
        plain.append(time.perf_counter() - start)

    checkpointer = ckpt.Checkpointer(out / "checkpoints", every_steps=1, keep_last=2, async_save=True)
    blocking, with_save, totals = [], [], []
    for step in range(1, saves + 1):
        start = time.perf_counter()
        checkpointer.maybe_save(step, state, {"step": step}, config.to_json())
        blocking.append(time.perf_counter() - start)
        state = jax.block_until_ready(step_fn(state))
        with_save.append(time.perf_counter() - start)
        checkpointer.wait_until_finished()
        totals.append(time.perf_counter() - start)
    print(f"step without save: {np.mean(plain) * 1e3:.1f} ms; save blocking time per step: "
          f"{np.mean(blocking) * 1e3:.1f} ms (max {np.max(blocking) * 1e3:.1f}); step incl. save start: "
          f"{np.mean(with_save) * 1e3:.1f} ms")
    on_disk = directory_mb(out / "checkpoints" / str(saves))
    print(f"save (async, to commit): {np.mean(totals):.2f} s per checkpoint = "
          f"{state_mb / np.mean(totals):.0f} MiB/s; on disk {on_disk:.0f} MiB")

    sync = ckpt.Checkpointer(out / "sync", every_steps=1, keep_last=1, async_save=False)
    start = time.perf_counter()
    sync.maybe_save(1, state, {}, config.to_json())
    sync.wait_until_finished()
    print(f"save (synchronous): {time.perf_counter() - start:.2f} s = "
          f"{state_mb / (time.perf_counter() - start):.0f} MiB/s")
    sync.close()

    abstract = state_lib.abstract_state(setup, optimizer)
    start = time.perf_counter()
    restored, _ = checkpointer.restore_latest(abstract)
    jax.block_until_ready(restored)
    elapsed = time.perf_counter() - start
    print(f"restore: {elapsed:.2f} s = {state_mb / elapsed:.0f} MiB/s")
    checkpointer.close()


def run_tool(*arguments: str) -> tuple[float, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *arguments],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    peak = float(re.search(r"peak host memory \(RSS\) (\d+) MiB", done.stdout).group(1))
    return peak, time.perf_counter() - start


def bench_conversion(out: Path) -> None:
    checkpoint = out / "checkpoints"
    params_mb = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
                    for m in jax.tree.leaves(ckpt.params_metadata(checkpoint))) / 2**20
    largest_mb = max(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
                     for m in jax.tree.leaves(ckpt.params_metadata(checkpoint))) / 2**20
    python_only = subprocess.run(
        [sys.executable, "-c", "import jax, orbax.checkpoint, plamo_jax.convert.hf as hf; "
         "import plamo_jax.train.checkpoint; jax.devices(); print(hf.peak_rss_mib())"],
        capture_output=True, text=True, cwd=REPO)
    baseline = float(python_only.stdout.split()[-1])
    print(f"parameters: {params_mb:.0f} MiB fp32, largest stacked parameter {largest_mb:.0f} MiB; "
          f"interpreter + imports alone: {baseline:.0f} MiB RSS")
    for dtype in ("fp32", "bf16"):
        peak, seconds = run_tool("to-hf", "--checkpoint", str(checkpoint), "--out", str(out / f"hf_{dtype}"),
                                 "--dtype", dtype)
        written = directory_mb(out / f"hf_{dtype}")
        print(f"to-hf {dtype}: {seconds:.1f} s, {written:.0f} MiB written, peak RSS {peak:.0f} MiB = "
              f"imports + {peak - baseline:.0f} MiB ({(peak - baseline) / params_mb:.2f} x params)")
    peak, seconds = run_tool("from-hf", "--hf", str(out / "hf_fp32"), "--out", str(out / "imported"))
    print(f"from-hf: {seconds:.1f} s, peak RSS {peak:.0f} MiB = imports + {peak - baseline:.0f} MiB "
          f"({(peak - baseline) / params_mb:.2f} x params; on CPU the imported arrays are host memory)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--out", default="/tmp/bench_checkpoint")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    bench_save_and_restore(build_config(args), out, args.saves)
    bench_conversion(out)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
