"""One training step of the same model in plamo_jax, MaxText and transformers (PyTorch), side by side.

Each system trains the same shape from random weights on random tokens (fp32 weights and compute,
one AdamW step per batch, no checkpointing, the same batch x sequence, the layers unrolled rather than
scanned): plamo_jax with `model.remat=none`, `model.scan_layers=False` and dense attention; MaxText
with `scan_layers=false` and its defaults for the decoder block (`remat_policy=full`,
`attention=dot_product`, synthetic data); transformers' `*ForCausalLM` with torch's AdamW on as many
threads as this machine has cores. Every measurement runs in its own
process, the systems interleaved A B C for --rounds rounds; a round's figure is the median step time
after --warmup steps (compilation included in the first), and each system's figure is the median
over rounds. Shapes (--shapes):

- llama: 125.8M parameters: hidden 768, 12 layers, 12 query / 4 KV heads of 64, MLP 2048, vocab
  32768, untied embeddings, no QK-norm (plamo_jax, MaxText, transformers LlamaForCausalLM);
- qwen3: the same with tied embeddings and QK-norm (plamo_jax, transformers Qwen3ForCausalLM);
- moe: hidden 512, 8 layers, 8 / 4 heads, 8 experts top-2 of width 1024, dropless (plamo_jax,
  MaxText's Mixtral block).

MaxText runs from its own Python 3.12 environment (`make bench-peers` builds `.venv-maxtext` with the
pinned maxtext wheel and its CPU requirements); without it (--maxtext-python missing) its column is
skipped with a note. Prints each round, each median and the ratios ours / peer; asserts nothing.

--profile adds one traced run of each JAX system per shape: a step's time by XLA operation (the CPU
runtime's per-operation events, summed over the traced steps), by kind of operation, and for ours
the source of the largest non-matmul operations (the compiled program's metadata) and XLA's cost
analysis. `make bench-peers` runs all of it (about 45 minutes on a 2-core machine).

--scanned adds ours with the layers scanned (`model.scan_layers=True`, the default for training) to
every round, printed with its ratio to the unrolled run.

Ours starts as launch/train.py starts on a CPU machine: restarted with glibc's malloc on transparent
huge pages where the kernel and glibc allow it and keeping the memory it frees, dispatch synchronous
(plamo_jax/host_memory.py); MaxText and transformers run as their own launchers leave them.
--host-memory adds ours with huge pages only (PLAMO_HOST_MEMORY=huge_pages) and ours without the restart
(PLAMO_HOST_MEMORY=off).

    python benchmarks/bench_peers.py [--shapes llama,qwen3,moe] [--rounds 3] [--steps 4] [--warmup 2]
        [--batch 4] [--seq-len 512] [--maxtext-python .venv-maxtext/bin/python]
        [--scanned] [--host-memory] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
from bench_train import synthetic_batch  # the sibling script (benchmarks/ is on sys.path)
from jax.profiler import ProfileData

from plamo_jax import host_memory
from plamo_jax.configuration import default_config, finalize
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train.run import build_run

REPO = Path(__file__).resolve().parent.parent
RESULT = "PEER_RESULT "  # prefix of a worker's one-line JSON answer

# name -> the shape every system builds (keys follow plamo_jax's model config)
SHAPES = {
    "llama": dict(family="dense", vocab_size=32768, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                  head_dim=64, mlp_dim=2048, tie_embeddings=False, qk_norm=False),
    "qwen3": dict(family="dense", vocab_size=32768, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                  head_dim=64, mlp_dim=2048, tie_embeddings=True, qk_norm=True),
    "moe": dict(family="moe", vocab_size=32768, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4,
                head_dim=64, num_experts=8, num_experts_per_token=2, expert_mlp_dim=1024,
                tie_embeddings=False, qk_norm=False),
}
SCANNED = "plamo_jax_scanned"  # ours with model.scan_layers=True (--scanned): what the layer loop saves
# ours with PLAMO_HOST_MEMORY=huge_pages and =off (--host-memory): what kept memory and huge pages save
HOST_MEMORY_CHOICES = {"plamo_jax_huge_pages_only": "huge_pages", "plamo_jax_as_started": "off"}
OURS = ("plamo_jax", SCANNED, *HOST_MEMORY_CHOICES)
PEERS = {"llama": ("plamo_jax", "maxtext", "transformers"), "qwen3": ("plamo_jax", "transformers"),
         "moe": ("plamo_jax", "maxtext")}


# ------------------------------------------------------------------------------------------- workers
# Each worker runs in its own process; only the transformers worker imports torch (whose thread pools
# would otherwise start in the JAX workers too), hence its imports inside the function.


def ours_step_times(shape: dict, batch: int, seq_len: int, steps: int, warmup: int,
                    profile_dir: str = "", scan_layers: bool = False) -> list[float]:
    config = default_config()
    config.model.update(shape)
    config.model.remat, config.model.attention_impl, config.model.dtype = "none", "dense", "float32"
    config.model.scan_layers = scan_layers  # unrolled by default, as MaxText and transformers run here
    config.train.global_batch_size, config.train.seq_len = batch, seq_len
    config.optimizer.warmup_steps = 1
    run = build_run(finalize(config))
    device_batch = jax.device_put(synthetic_batch(batch, seq_len, shape["vocab_size"]), run.batch_sharding)
    state = run.fresh_state()
    times = []
    with sharding_context(run.mesh, run.rules):
        for index in range(warmup + steps):
            if profile_dir and index == warmup:
                jax.profiler.start_trace(profile_dir)
            start = time.perf_counter()
            state, metrics = run.step(state, device_batch, None)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
        if profile_dir:
            jax.profiler.stop_trace()
            compiled = run.step.lower(run.abstract_state(), run.abstract_batch(), None).compile()
            Path(profile_dir, "step.hlo").write_text(compiled.as_text())
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            Path(profile_dir, "cost.json").write_text(json.dumps(
                {key: float(cost.get(key, 0.0)) for key in ("flops", "bytes accessed", "transcendentals")}))
    return times


def transformers_step_times(shape: dict, batch: int, seq_len: int, steps: int) -> list[float]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    common = dict(vocab_size=shape["vocab_size"], hidden_size=shape["d_model"],
                  intermediate_size=shape["mlp_dim"], num_hidden_layers=shape["num_layers"],
                  num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                  head_dim=shape["head_dim"], tie_word_embeddings=shape["tie_embeddings"],
                  max_position_embeddings=seq_len)
    if shape["qk_norm"]:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, shape["vocab_size"], (batch, seq_len))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def maxtext_arguments(shape: dict, batch: int, seq_len: int, steps: int, out: str) -> list[str]:
    """MaxText's train command line for `shape` (its config keys), single CPU device, synthetic data."""
    arguments = [f"run_name=peers_{os.getpid()}", f"base_output_directory={out}", "hardware=cpu",
                 "dataset_type=synthetic", f"steps={steps}", f"per_device_batch_size={batch}",
                 f"max_target_length={seq_len}", "dtype=float32", "weight_dtype=float32",
                 "attention=dot_product", "enable_checkpointing=false", "log_period=1",
                 "skip_jax_distributed_system=true", "scan_layers=false",
                 f"vocab_size={shape['vocab_size']}", f"base_emb_dim={shape['d_model']}",
                 f"base_num_query_heads={shape['num_heads']}", f"base_num_kv_heads={shape['num_kv_heads']}",
                 f"head_dim={shape['head_dim']}", f"base_num_decoder_layers={shape['num_layers']}",
                 f"logits_via_embedding={str(shape['tie_embeddings']).lower()}"]
    if shape["family"] == "moe":
        arguments += ["decoder_block=mixtral", f"base_mlp_dim={shape['expert_mlp_dim']}",
                      f"base_moe_mlp_dim={shape['expert_mlp_dim']}", "load_balance_loss_weight=0.01",
                      f"num_experts={shape['num_experts']}",
                      f"num_experts_per_tok={shape['num_experts_per_token']}",
                      "megablox=false", "sparse_matmul=false", "capacity_factor=-1"]
    else:
        arguments += ["decoder_block=llama2", f"base_mlp_dim={shape['mlp_dim']}"]
    return arguments


def maxtext_step_times(python: str, shape: dict, batch: int, seq_len: int, steps: int, warmup: int,
                       profile_dir: str = "") -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        profile = ["profiler=xplane", f"skip_first_n_steps_for_profiler={warmup}",
                   f"profiler_steps={steps}"] if profile_dir else []
        import_config = ("import maxtext, os; print(os.path.join(os.path.dirname(maxtext.__file__), "
                         "'configs', 'decoupled_base_test.yml'))")
        config = subprocess.run([python, "-c", import_config], check=True, capture_output=True,
                                text=True).stdout.strip()
        env = dict(os.environ, DECOUPLE_GCLOUD="TRUE", JAX_PLATFORMS="cpu")
        done = subprocess.run([python, "-m", "maxtext.trainers.pre_train.train", config,
                               *maxtext_arguments(shape, batch, seq_len, warmup + steps, out), *profile],
                              capture_output=True, text=True, env=env, cwd=out)
        for trace in Path(out).rglob("*.xplane.pb") if profile_dir else ():
            Path(profile_dir, trace.name).write_bytes(trace.read_bytes())
    log = done.stdout + done.stderr
    times = [float(t) for t in re.findall(r"completed step: \d+, seconds: ([0-9.]+)", log)]
    if done.returncode or len(times) < warmup + steps:
        raise RuntimeError(f"MaxText exited {done.returncode} after {len(times)} steps:\n{log[-3000:]}")
    return times


def worker(args) -> None:
    shape = SHAPES[args.shape]
    if args.worker in OURS:
        host_memory.reexec_for_cpu_training()  # as launch/train.py does first; returns once restarted
        times = ours_step_times(shape, args.batch, args.seq_len, args.steps, args.warmup, args.profile_dir,
                                scan_layers=args.worker == SCANNED)
    elif args.worker == "transformers":
        times = transformers_step_times(shape, args.batch, args.seq_len, args.warmup + args.steps)
    else:
        times = maxtext_step_times(args.maxtext_python, shape, args.batch, args.seq_len, args.steps,
                                   args.warmup, args.profile_dir)
    host_memory_setup = {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
                         "async dispatch": jax.config.read("jax_cpu_enable_async_dispatch")}
    print(RESULT + json.dumps({"times": times, "host memory": host_memory_setup}), flush=True)


# ------------------------------------------------------------------------------------------ orchestra


def worker_environment(system: str) -> dict[str, str]:
    """The environment `system`'s worker starts with: ours with its PLAMO_HOST_MEMORY choice, the peers
    with this process's own."""
    return os.environ | ({host_memory.CHOICE: HOST_MEMORY_CHOICES[system]} if system in HOST_MEMORY_CHOICES
                         else {})


def expected_host_memory(system: str) -> dict:
    """The GLIBC_TUNABLES and dispatch `system`'s worker should have run with: ours's restart adds the
    tunables (plamo_jax/host_memory.py) where they apply, and dispatches synchronously where they keep
    freed memory; the other columns keep this process's own."""
    environ = worker_environment(system)
    if system in OURS:
        environ |= host_memory.host_memory_environment(environ, host_memory.thp_mode(),
                                                       host_memory.glibc_version())
    kept = system in OURS and host_memory.keeps_freed_memory(environ)
    return {"GLIBC_TUNABLES": environ.get("GLIBC_TUNABLES", ""), "async dispatch": not kept}


def measure(system: str, shape: str, args, profile_dir: str = "") -> float:
    """Median step time after the warm-up steps, from a fresh process (profiled into `profile_dir`)."""
    environ = worker_environment(system)
    done = subprocess.run([sys.executable, __file__, "--worker", system, "--shape", shape,
                           "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                           "--maxtext-python", args.maxtext_python, "--profile-dir", profile_dir],
                          capture_output=True, text=True, cwd=REPO, env=environ)
    answers = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not answers:
        raise RuntimeError(f"{system} on {shape} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    answer = json.loads(answers[-1].removeprefix(RESULT))
    if answer["host memory"] != expected_host_memory(system):
        raise RuntimeError(f"{system} ran with {answer['host memory']}: "
                           f"expected {expected_host_memory(system)}")
    times = answer["times"]
    return statistics.median(times[args.warmup:])


# Events of the XLA CPU runtime's threads that are waiting, bookkeeping, or containers of other events
# (the executor, loops and calls, whose bodies' operations are counted themselves): not counted.
NOT_WORK = re.compile(r"^(end: |ThreadpoolListener|SlinkyThreadPool|MutexLock|ThunkExecutor"
                      r"|(while|conditional|call)(\.\d+)?$)")


def thunk_times(profile_dir: Path) -> collections.Counter:
    """Total nanoseconds per XLA operation (fusion, dot, copy, ...) on the XLA threads of a trace."""
    totals = collections.Counter()
    for trace in profile_dir.rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(trace)).planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLA"):
                    continue
                for event in line.events:
                    if not NOT_WORK.match(event.name):
                        totals[event.name] += event.duration_ns
    return totals


def print_profile(label: str, profile_dir: Path, steps: int, top: int = 15) -> None:
    """A step's time by XLA operation and by kind of operation (the name without its number)."""
    totals = thunk_times(profile_dir)
    if not totals:
        print(f"{label}: the trace holds no XLA operations")
        return
    per_step = sum(totals.values()) / steps / 1e9
    kinds = collections.Counter()
    for name, nanoseconds in totals.items():
        kinds[re.sub(r"\.\d+$", "", name)] += nanoseconds
    print(f"{label}: {len(totals)} distinct operations, {per_step:.3f} s of XLA work per step")
    for title, counter in (("by kind", kinds), ("largest", totals)):
        shares = (f"{name} {ns / steps / 1e9:.3f} s" for name, ns in counter.most_common(top))
        print(f"  {title}: " + ", ".join(shares))
    hlo = profile_dir / "step.hlo"
    if hlo.exists():  # what the largest non-matmul operations compute, from the compiled program
        sources = dict(re.findall(r'%([\w.-]+) = [^\n]*?op_name="([^"]+)"', hlo.read_text()))
        others = [(n, t) for n, t in totals.most_common() if not n.startswith(("ynn_fusion", "dot"))]
        for name, ns in others[:8]:
            print(f"    {name} {ns / steps / 1e9:.3f} s: {sources.get(name, '?')}")
    cost = profile_dir / "cost.json"
    if cost.exists():
        figures = json.loads(cost.read_text())
        print(f"  XLA cost analysis (a scanned loop body counted once): {figures['flops']:.4e} FLOPs, "
              f"{figures['bytes accessed']:.4e} bytes accessed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama,qwen3,moe")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--maxtext-python", default=str(REPO / ".venv-maxtext" / "bin" / "python"))
    parser.add_argument("--worker", choices=(*OURS, "maxtext", "transformers"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=tuple(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--profile-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--scanned", action="store_true",
                        help="also run ours with the layers scanned (model.scan_layers=True), interleaved")
    parser.add_argument("--host-memory", action="store_true",
                        help="also run ours with huge pages only and as started "
                             "(PLAMO_HOST_MEMORY=huge_pages, =off), interleaved")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one more run of each JAX system: where a step's time goes")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or args.rounds < 1 or args.steps < 1 or args.warmup < 1:
        parser.error(f"--shapes {args.shapes} --rounds {args.rounds} --steps {args.steps} --warmup "
                     f"{args.warmup}: expected shapes among {sorted(SHAPES)} and counts >= 1")
    have_maxtext = Path(args.maxtext_python).exists()
    if not have_maxtext:
        print(f"note: no MaxText environment at {args.maxtext_python} (make bench-peers builds one); "
              "its column is skipped")
    print(f"batch {args.batch} x {args.seq_len} tokens, fp32, {os.cpu_count()} cores; per round the median "
          f"of {args.steps} steps after {args.warmup} warm-up steps; ours with "
          f"{expected_host_memory('plamo_jax')} (THP mode {host_memory.thp_mode()}, "
          f"glibc {host_memory.glibc_version()})")
    for shape in shapes:
        systems = [s for s in PEERS[shape] if s != "maxtext" or have_maxtext]
        systems += [SCANNED] if args.scanned else []
        systems += list(HOST_MEMORY_CHOICES) if args.host_memory else []
        rounds = {system: [] for system in systems}
        for round_index in range(args.rounds):
            for system in systems:
                rounds[system].append(measure(system, shape, args))
            print(f"{shape} round {round_index + 1}: "
                  + ", ".join(f"{s} {rounds[s][-1]:.3f} s" for s in systems), flush=True)
        medians = {system: statistics.median(times) for system, times in rounds.items()}
        print(f"{shape} medians: " + ", ".join(f"{s} {t:.3f} s" for s, t in medians.items()))
        for peer in systems[1:]:
            print(f"{shape} ratio plamo_jax / {peer}: {medians['plamo_jax'] / medians[peer]:.3f}")
        if args.profile:
            for system in (s for s in systems if s not in ("transformers", SCANNED, *HOST_MEMORY_CHOICES)):
                with tempfile.TemporaryDirectory() as profile_dir:
                    measure(system, shape, args, profile_dir)
                    print_profile(f"{shape} {system}", Path(profile_dir), args.steps)


if __name__ == "__main__":
    main()
