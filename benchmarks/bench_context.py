"""Context parallelism on 8 simulated CPU devices: attention with the sequence sharded 8 ways.

One causal attention layer, forward + backward (`jax.grad` of the sum of the output with respect to
q, k and v), batch 1, fp32 unless --dtype, for each strategy of `model.context_parallel` on a mesh
with sequence=8:

- "none": what `Attention.attend` does with context_parallel="none": q, k and v (sharded along the
  sequence on entry) are constrained to the whole sequence, the flash kernel runs on the gathered
  sequence (heads would stay sharded over `tensor`, which is 1 here, so every device computes the
  whole layer), and the output is sharded along the sequence again. The train step never lays the
  batch out for "none", so this row is contiguous.
- "all_gather": keys and values gathered along the axis, queries local (balanced layout).
- "ring": key/value blocks rotate with ppermute, nothing gathered (balanced layout).
- "ring_contiguous": the ring without the balanced layout, for contrast.
- "ulysses": all-to-alls trade heads for sequence around the flash kernel (balanced layout); only where
  --heads and --kv-heads divide by 8 (e.g. --heads 8 --kv-heads 8 --head-dim 32: the default's work).

Per strategy: tokens/s (sequence length / the median of --steps runs of the compiled step; the median
leaves out the first run's one-time costs) and XLA's per-device memory of the compiled step
(`memory_analysis()`: temp + argument bytes; output bytes, the gradients, are printed apart), then
ratios against "none". Then the causal load balance: `context.live_blocks_per_shard` (the flash blocks
each shard computes), max/min over shards, balanced vs contiguous.

The 8 devices are simulated on this machine's CPU cores, so the figures show how memory scales and the
relative overheads, not accelerator speed: all 8 shards share the cores, so a step takes about the
total work of all devices (the redundant copies of "none" included) divided by the cores, and an idle
shard (the contiguous layout's early shards) costs nothing a busy one cannot use. On a shared machine
the times are noisy; the memory figures are exact.

Rows whose work summed over the devices exceeds --max-timed-tflop are compiled (memory) but not run:
by default "none" at 32k tokens (8 copies of the whole layer, 15 TFLOP). The defaults take ~9 minutes
on a 2-core machine, most of it the three 32k rows.

    python benchmarks/bench_context.py [--lengths 8192,32768] [--heads 4] [--kv-heads 2] [--head-dim 64]
        [--block 512] [--steps 3] [--dtype float32]
        [--strategies none,all_gather,ring,ring_contiguous,ulysses] [--max-timed-tflop 4]

`--mode ssm`: the hybrid's Mamba layer under the balanced layout, the two ways of
`model.ssm_context_layout`, on meshes with sequence = each of --shards:

- "in_place": each shard scans its two chunks (r and 2S-1-r) where they are; the chunk states
  [B, H, P, N] and the conv tails are all-gathered and combined (models/ssm.py).
- "undo_redo" (Megatron's): the mixer's input [B, L/S, D] moves to contiguous chunks (two ppermutes),
  the SSM scans one chunk per shard, the output moves back (two more; the backward repeats them).
- "contiguous": "in_place" without the balanced layout (the batch never laid out), for contrast.

One MambaMixer (models/ssm.py, built from the model config: d_model, SSM heads x head dim, state,
chunk), forward + backward (`jax.grad` of the output's squared sum with respect to the parameters and
the input), batch 1, fp32. The variants run interleaved (A B C, A B C, ...) for --rounds rounds after
one untimed run each; a variant's figure is the median of its rounds. Per variant also XLA's per-device
temporaries and the bytes of the compiled per-device program's collectives, by kind (each one's whole
buffer: gathered, before scattering, permuted, summed; all-reduce is the weight gradients' sum over the
shards, alike in every variant; shard_map's psums over single-device groups are left out).

    python benchmarks/bench_context.py --mode ssm [--lengths 8192,32768] [--shards 8,4] [--d-model 256]
        [--ssm-heads 8] [--ssm-head-dim 64] [--ssm-state 64] [--ssm-chunk 128] [--rounds 5]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from plamo_jax.configuration import default_config  # noqa: E402
from plamo_jax.models.context_attention import context_attention  # noqa: E402
from plamo_jax.models.flash_attention import flash_attention_with_max_logit  # noqa: E402
from plamo_jax.models.hybrid import make_mamba  # noqa: E402
from plamo_jax.parallel import context  # noqa: E402
from plamo_jax.parallel.rules import DEFAULT_RULES, MESH_AXES, constrain, sharding_context  # noqa: E402

ROWS = {  # name: (context_parallel strategy, balanced layout)
    "none": ("none", False),
    "all_gather": ("all_gather", True),
    "ring": ("ring", True),
    "ring_contiguous": ("ring", False),
    "ulysses": ("ulysses", True),
}


SSM_ROWS = {  # name: (model.ssm_context_layout, balanced layout)
    "in_place": ("in_place", True),
    "undo_redo": ("undo_redo", True),
    "contiguous": ("in_place", False),
}
COLLECTIVES = ("all-gather", "reduce-scatter", "collective-permute", "all-reduce")
MiB = 2**20


def sequence_mesh(shards: int) -> Mesh:
    shape = [shards if axis == "sequence" else 1 for axis in MESH_AXES]
    return Mesh(np.array(jax.devices()[:shards]).reshape(shape), MESH_AXES)


def attention_fn(strategy: str, block: int):
    """out [B, L, H, D] of one causal attention over q/k/v sharded along the sequence."""

    def none(q, k, v, segments):  # Attention.attend's path for context_parallel="none"
        q = constrain(q, ("act_batch", None, "act_heads", "act_head_dim"))
        k = constrain(k, ("act_batch", None, "act_kv_heads", "act_head_dim"))
        v = constrain(v, ("act_batch", None, "act_kv_heads", "act_head_dim"))
        tokens = context.layout_tokens(q.shape[1])  # None: "none" is never laid out
        out, _ = flash_attention_with_max_logit(q, k, v, segments, 0, block, tokens)
        out = constrain(out, ("act_batch", None, "act_heads", "act_head_dim"))
        return constrain(out, ("act_batch", "act_length", "act_heads", "act_head_dim"))

    def parallel(q, k, v, segments):
        return context_attention(q, k, v, segments, 0, strategy=strategy, block=block)[0]

    return none if strategy == "none" else parallel


def causal_flops(length: int, heads: int, head_dim: int) -> float:
    """Matmul FLOPs of one causal flash forward (2 L^2 H D) + backward (5 L^2 H D: scores recomputed)."""
    return 7.0 * length**2 * heads * head_dim


def measure(mesh: Mesh, name: str, args, length: int, timed: bool) -> dict:
    strategy, balanced = ROWS[name]
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    shapes = [(1, length, args.heads, args.head_dim)] + [(1, length, args.kv_heads, args.head_dim)] * 2
    sharding = NamedSharding(mesh, PartitionSpec(None, "sequence", None, None))
    q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal(shape), dtype), sharding) for shape in shapes)
    segments = jax.device_put(jnp.ones((1, length), jnp.int32),
                              NamedSharding(mesh, PartitionSpec(None, "sequence")))
    attend = attention_fn(strategy, args.block)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v, segments).astype(jnp.float32))

    with sharding_context(mesh, DEFAULT_RULES), context.balanced_layout(balanced):
        start = time.perf_counter()
        # gradients sharded like q, k and v, as they flow back to the (sequence-sharded) projections
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), out_shardings=(sharding,) * 3)
        compiled = grad.lower(q, k, v).compile()
        compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    seconds = float("nan")
    if timed:
        times = []
        for _ in range(args.steps):  # the median leaves out the first run's one-time costs
            start = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v))
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    return {
        "compile": compile_seconds, "seconds": seconds, "tokens_per_s": length / seconds,
        "temp": memory.temp_size_in_bytes, "argument": memory.argument_size_in_bytes,
        "output": memory.output_size_in_bytes,
    }


def mamba_config(args, layout: str):
    m = default_config().model
    m.family, m.d_model = "hybrid", args.d_model
    m.ssm_num_heads, m.ssm_head_dim, m.ssm_state_dim = args.ssm_heads, args.ssm_head_dim, args.ssm_state
    m.ssm_chunk_size, m.ssm_context_layout = args.ssm_chunk, layout
    return m


def group_size(hlo_line: str) -> int | None:
    """Devices in each replica group of a collective (None without groups: a collective-permute)."""
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", hlo_line)
    if listed:
        return len(listed.group(1).split(","))
    iota = re.search(r"replica_groups=\[\d+,(\d+)\]", hlo_line)
    return int(iota.group(1)) if iota else None


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Per kind of collective in a compiled per-device program, the bytes of its whole buffer: the result
    (an all-gather's gathered array), a reduce-scatter's operand (its result times the group)."""
    sizes = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "bf16": 2, "f16": 2}
    totals = collections.Counter()
    for line in hlo_text.splitlines():
        match = re.search(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
        devices = group_size(line)
        if not match or devices == 1:  # shard_map's transposes leave psums over no axis: nothing moves
            continue
        scale = devices if match.group(2) == "reduce-scatter" else 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            totals[match.group(2)] += scale * sizes[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return totals


def compile_mamba(mesh: Mesh, name: str, args, length: int):
    """(compiled fwd+bwd of one Mamba mixer, its inputs) for an SSM_ROWS variant."""
    layout, balanced = SSM_ROWS[name]
    graphdef, params = nnx.split(make_mamba(mamba_config(args, layout), nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    x = jax.device_put(jnp.asarray(rng.standard_normal((1, length, args.d_model)), jnp.float32),
                       NamedSharding(mesh, PartitionSpec(None, "sequence", None)))
    segments = jax.device_put(jnp.ones((1, length), jnp.int32),
                              NamedSharding(mesh, PartitionSpec(None, "sequence")))

    def loss(params, x, segments):  # squared: a constant cotangent would let XLA fold the backward's moves
        out = nnx.merge(graphdef, params)(x, segments)
        return jnp.sum(out * out)

    with sharding_context(mesh, DEFAULT_RULES), context.balanced_layout(balanced):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return grad.lower(params, x, segments).compile(), (params, x, segments)


def interleaved_seconds(compiled: dict, inputs: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, timed in turn round after round (A B C, A B C, ...)."""
    for name in compiled:  # first runs pay one-time costs
        jax.block_until_ready(compiled[name](*inputs[name]))
    times = collections.defaultdict(list)
    for _ in range(rounds):
        for name in compiled:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*inputs[name]))
            times[name].append(time.perf_counter() - start)
    return times


def ssm_main(args):
    names = args.ssm_variants.split(",")
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind} (simulated) on {os.cpu_count()} CPU cores; "
          f"one Mamba mixer: d_model {args.d_model}, {args.ssm_heads} SSM heads x {args.ssm_head_dim}, state "
          f"{args.ssm_state}, chunk {args.ssm_chunk}, fp32, batch 1; forward + backward; interleaved "
          f"rounds: median (min-max) of {args.rounds}; memory and collective MiB per device (XLA)")
    print(f"{'tokens':>7} {'shards':>6} {'variant':>10} {'step s':>7} {'min-max':>11} {'vs ' + names[0]:>12} "
          f"{'temp MiB':>9} " + " ".join(f"{kind:>18}" for kind in COLLECTIVES))
    for length in [int(x) for x in args.lengths.split(",")]:
        for shards in [int(x) for x in args.shards.split(",")]:
            mesh = sequence_mesh(shards)
            built = {name: compile_mamba(mesh, name, args, length) for name in names}
            times = interleaved_seconds({n: b[0] for n, b in built.items()},
                                        {n: b[1] for n, b in built.items()}, args.rounds)
            seconds = {name: statistics.median(t) for name, t in times.items()}
            for name, (compiled, _) in built.items():
                moved = collective_bytes(compiled.as_text())
                spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
                print(f"{length:7d} {shards:6d} {name:>10} {seconds[name]:7.3f} {spread:>11} "
                      f"{seconds[name] / seconds[names[0]]:12.2f} "
                      f"{compiled.memory_analysis().temp_size_in_bytes / MiB:9.1f} "
                      + " ".join(f"{moved[kind] / MiB:18.2f}" for kind in COLLECTIVES), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("attention", "ssm"), default="attention")
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed runs after compiling (median)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--strategies", default=",".join(ROWS))
    parser.add_argument("--max-timed-tflop", type=float, default=4.0,
                        help="rows whose work summed over the 8 devices exceeds this are compiled, not run")
    parser.add_argument("--shards", default="8,4", help="ssm: sequence axis sizes")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--ssm-heads", type=int, default=8)
    parser.add_argument("--ssm-head-dim", type=int, default=64)
    parser.add_argument("--ssm-state", type=int, default=64)
    parser.add_argument("--ssm-chunk", type=int, default=128)
    parser.add_argument("--ssm-variants", default=",".join(SSM_ROWS))
    parser.add_argument("--rounds", type=int, default=5, help="ssm: interleaved timed rounds (median)")
    args = parser.parse_args()
    if args.mode == "ssm":
        ssm_main(args)
    else:
        attention_main(args)


def attention_main(args):
    shards = 8
    mesh = sequence_mesh(shards)
    names = args.strategies.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind} (simulated) on {os.cpu_count()} CPU cores; "
          f"mesh sequence={shards}; heads {args.heads} (kv {args.kv_heads}) x {args.head_dim}, {args.dtype}, "
          f"batch 1, causal, flash block {args.block}; forward + backward; median of {args.steps} runs")
    print("work: matmul TFLOP summed over the devices (\"none\" computes the whole layer on each); "
          "memory: XLA's per-device bytes")
    for length in lengths:
        print(f"\n{length} tokens ({length // shards} per device)")
        print(f"{'strategy':>16} {'work TF':>8} {'compile s':>9} {'step s':>8} {'tokens/s':>9} "
              f"{'temp MiB':>9} {'args MiB':>9} {'temp+args':>9} {'grads MiB':>9} {'speed vs none':>13} "
              f"{'memory vs none':>14}")
        results = {}
        for name in names:
            if ROWS[name][0] == "ulysses" and (args.heads % shards or args.kv_heads % shards):
                print(f"{name:>16} skipped: --heads {args.heads} / --kv-heads {args.kv_heads} do not divide "
                      f"by {shards} shards")
                continue
            copies = shards if ROWS[name][0] == "none" else 1
            work = copies * causal_flops(length, args.heads, args.head_dim) / 1e12
            r = results[name] = measure(mesh, name, args, length, timed=work <= args.max_timed_tflop)
            base = results.get("none")
            ratios = ""
            if base is not None:
                speed = r["tokens_per_s"] / base["tokens_per_s"]
                ratios = (f"{'-' if np.isnan(speed) else f'{speed:.2f}':>13} "
                          f"{(r['temp'] + r['argument']) / (base['temp'] + base['argument']):14.3f}")
            timing = (f"{'-':>8} {'-':>9}" if np.isnan(r["seconds"])
                      else f"{r['seconds']:8.2f} {r['tokens_per_s']:9.0f}")
            print(f"{name:>16} {work:8.2f} {r['compile']:9.1f} {timing} {r['temp'] / MiB:9.1f} "
                  f"{r['argument'] / MiB:9.1f} {(r['temp'] + r['argument']) / MiB:9.1f} "
                  f"{r['output'] / MiB:9.1f} {ratios}", flush=True)
    print(f"('-': not run, over --max-timed-tflop={args.max_timed_tflop:g})")

    print(f"\ncausal load balance: live (query, key) flash blocks per shard, {shards} shards")
    print(f"{'tokens':>7} {'block':>6} {'layout':>10} {'min':>6} {'max':>6} {'max/min':>8} {'max/mean':>8}")
    for length in lengths:
        block = math.gcd(length // (2 * shards), args.block)  # the kernel's block under the balanced layout
        for balanced in (True, False):
            live = context.live_blocks_per_shard(length, shards, balanced=balanced, block=block)
            print(f"{length:7d} {block:6d} {'balanced' if balanced else 'contiguous':>10} {live.min():6d} "
                  f"{live.max():6d} {live.max() / live.min():8.2f} {live.max() / live.mean():8.2f}")


if __name__ == "__main__":
    main()
