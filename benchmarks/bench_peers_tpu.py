"""plamo_jax next to MaxText on the TPU compiler: the same Llama-3-8B step compiled for v5p-64, no TPU.

v5p-64 in MaxText's naming (TensorCores) is 32 chips: our topology v5p:2x4x4.

Both programs are compiled on this host by libtpu for compile-only devices of the topology (ours with
`plamo_jax.estimate.aot`, MaxText with its own `train_compile.py`, from the `.venv-maxtext` that
`make bench-peers` builds, plus libtpu). The step: Llama-3-8B shape, 8192 tokens per chip (one
sequence), FSDP over all 32 chips, full rematerialisation, bf16 compute on fp32 parameters, AdamW.
Attention: ours `flash` (blockwise, plain JAX); MaxText's default on TPU (`autoselected`: its Pallas
flash kernel). Printed per chip from each compiled program: XLA's argument / output / temporary bytes
and their peak, cost analysis FLOPs and bytes accessed (a scanned layer loop's body counts once in both
programs), and the collectives of the optimized HLO (count and result bytes by kind). Asserts nothing.

    python benchmarks/bench_peers_tpu.py [--topology v5p:2x4x4] [--maxtext-python .venv-maxtext/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from plamo_jax.configuration import load_recipe
from plamo_jax.estimate import aot

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30

# Runs inside MaxText's environment: its train_compile main, with the compiled step captured.
MAXTEXT_CAPTURE = r"""
import json, sys
from absl import app
from maxtext.trainers.pre_train import train_compile
out = sys.argv.pop(1)
compile_step = train_compile.jit_and_compile

def capturing(*args, **kwargs):
    compiled = compile_step(*args, **kwargs)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    with open(out + ".json", "w") as f:
        json.dump({"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                   "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
                   "flops": float(cost.get("flops", 0.0)),
                   "bytes_accessed": float(cost.get("bytes accessed", 0.0))}, f)
    with open(out + ".hlo", "w") as f:
        f.write(compiled.as_text())
    return compiled

train_compile.jit_and_compile = capturing
app.run(train_compile.main)
"""


def ours(topology: aot.Topology) -> dict:
    config = load_recipe("llama3_8b")
    config.train.global_batch_size = topology.chips  # one 8192-token sequence per chip
    config.train.microbatches = 1
    result = aot.compile_for_topology(config, topology)
    if result.xla is None:
        raise SystemExit(f"plamo_jax: {result.oom_message}")
    x = result.xla
    return {"arguments": x.argument, "outputs": x.output, "aliased": x.alias, "temporaries": x.temp,
            "flops": result.xla_flops, "bytes_accessed": result.xla_bytes_accessed,
            "collectives": {c.kind: (c.count, c.bytes) for c in result.collectives},
            "seconds": result.lower_seconds + result.compile_seconds}


def maxtext(python: str, topology: aot.Topology, seq_len: int) -> dict:
    generation = topology.generation
    cores = topology.chips * (2 if generation in ("v4", "v5p") else 1)  # MaxText names v4/v5p by cores
    with tempfile.TemporaryDirectory() as work:
        base = subprocess.run([python, "-c", "import maxtext, os; print(os.path.join(os.path.dirname("
                               "maxtext.__file__), 'configs', 'decoupled_base_test.yml'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
        out = str(Path(work, "step"))
        arguments = [base, f"run_name=peers_tpu_{os.getpid()}", f"base_output_directory={work}",
                     f"compile_topology={generation}-{cores}", "compile_topology_num_slices=1",
                     "model_name=llama3-8b", "per_device_batch_size=1", f"max_target_length={seq_len}",
                     "remat_policy=full", "dtype=bfloat16", "weight_dtype=float32",
                     "enable_checkpointing=false", "dataset_type=synthetic"]
        env = dict(os.environ, DECOUPLE_GCLOUD="TRUE", TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu")
        done = subprocess.run([python, "-c", MAXTEXT_CAPTURE, out, *arguments], capture_output=True,
                              text=True, env=env, cwd=work)
        if done.returncode or not Path(out + ".json").exists():
            raise SystemExit(f"MaxText train_compile exited {done.returncode}:\n"
                             f"{(done.stdout + done.stderr)[-3000:]}")
        figures = json.loads(Path(out + ".json").read_text())
        figures["collectives"] = {c.kind: (c.count, c.bytes)
                                  for c in aot.collectives(Path(out + ".hlo").read_text())}
    return figures


def peak(figures: dict) -> float:
    return figures["arguments"] + figures["outputs"] + figures["temporaries"] - figures["aliased"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="v5p:2x4x4")
    parser.add_argument("--maxtext-python", default=str(REPO / ".venv-maxtext" / "bin" / "python"))
    args = parser.parse_args()
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    topology = aot.get_topology(args.topology)
    seq_len = int(load_recipe("llama3_8b").train.seq_len)
    columns = {"plamo_jax": ours(topology), "MaxText": maxtext(args.maxtext_python, topology, seq_len)}
    print(f"llama3_8b train step on {topology.label}: {seq_len} tokens per chip, FSDP over "
          f"{topology.chips} chips, remat full (per chip, from each compiled program)")
    rows = [("arguments", lambda f: f["arguments"] / GIB, "{:.2f} GiB"),
            ("outputs", lambda f: f["outputs"] / GIB, "{:.2f} GiB"),
            ("temporaries", lambda f: f["temporaries"] / GIB, "{:.2f} GiB"),
            ("peak", lambda f: peak(f) / GIB, "{:.2f} GiB"),
            ("XLA FLOPs", lambda f: f["flops"], "{:.3e}"),
            ("XLA bytes accessed", lambda f: f["bytes_accessed"], "{:.3e}")]
    print(f"{'':24s}" + "".join(f"{name:>16s}" for name in columns) + f"{'ours / MaxText':>16s}")
    a, b = columns["plamo_jax"], columns["MaxText"]
    for label, value, form in rows:
        ratio = value(a) / value(b) if value(b) else float("nan")
        print(f"{label:24s}" + "".join(f"{form.format(value(f)):>16s}" for f in columns.values())
              + f"{ratio:16.2f}")
    kinds = sorted(set(a["collectives"]) | set(b["collectives"]))
    for kind in kinds:
        cells = []
        for figures in columns.values():
            count, size = figures["collectives"].get(kind, (0, 0.0))
            cells.append(f"{count} / {size / GIB:.2f} GiB")
        print(f"{kind + ' (ops / bytes)':24s}" + "".join(f"{cell:>16s}" for cell in cells))
    print(f"compile: plamo_jax {a['seconds']:.0f} s")


if __name__ == "__main__":
    main()
