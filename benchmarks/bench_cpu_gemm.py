"""fp32 GEMM rates on the CPU: XLA under each matmul path this jaxlib offers, against torch.

The training step of the 125.8M Llama shape (bench_peers.py, batch 4 x 512 = 2048 tokens) spends
most of its time in a few GEMM shapes; this measures those shapes alone, in GFLOP/s:

- the MLP's up / gate (2048 x 768 x 2048) and down (2048 x 2048 x 768) projections, the LM head
  (2048 x 768 x 32768) and its input and weight gradients (the 32768-word and the token axis
  contracted), the up projection's input gradient (its weight read transposed) and an MLP weight
  gradient (768 x 2048 x 2048);
- attention's score and value products per (batch, head) ([48, 512, 64] x [48, 64, 512] and
  [48, 512, 512] x [48, 512, 64]) and the scores in our layout (each KV head's query group merged
  into the rows: [16, 1536, 64] x [16, 64, 512]).

Each XLA setting is a set of XLA debug options (what `--xla_...` flags in XLA_FLAGS set) given to
the compiler for that function only, so every setting and torch (as many threads as cores) run in
one process, interleaved A B C per round. A round's figure is the median of --repeats calls; each
printed figure is the median over --rounds, then every round. Beside the rates, each setting's
largest error against float64 on a slice of rows, relative to the largest reference value (fp32
rounding over these sums is ~1e-6), and the HLO that carries the dot. Asserts nothing.

    python benchmarks/bench_cpu_gemm.py [--rounds 5] [--repeats 5] [--settings default,eigen,...]
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

# name -> XLA debug options. This jaxlib sends every supported dot to YNNPACK by default (library
# fusion type `individual_dot`); the others are the matmul paths its flags can choose instead.
SETTINGS = {
    "default": {},
    # no YNNPACK: dots run in XLA's own dot thunk (Eigen's tensor contraction)
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "eigen_vec512": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_prefer_vector_width": 512},
    # YNNPACK fusions of a dot with its elementwise neighbours (in place of single dots)
    "ynn_fusions": {"xla_cpu_experimental_ynn_fusion_type":
                    "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"},
    # XNNPACK (YNNPACK's predecessor): its dot fusions, and its greedy graph fusion
    "xnn": {"xla_cpu_experimental_ynn_fusion_type": "",
            "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "xnn_graph": {"xla_cpu_experimental_ynn_fusion_type": "",
                  "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
    # oneDNN: its library fusions, and the older custom-call rewriter
    "onednn": {"xla_cpu_experimental_ynn_fusion_type": "",
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "onednn_call": {"xla_cpu_experimental_ynn_fusion_type": "",
                    "xla_cpu_experimental_onednn_custom_call": True},
}

# name -> (einsum of the product, lhs shape, rhs shape); the lhs's first output axis that the rhs
# lacks is the one sliced for the float64 check
SHAPES = {
    "mlp up 2048x768x2048": ("mk,kn->mn", (2048, 768), (768, 2048)),
    "mlp down 2048x2048x768": ("mk,kn->mn", (2048, 2048), (2048, 768)),
    "lm head 2048x768x32768": ("mk,kn->mn", (2048, 768), (768, 32768)),
    "lm head input grad 2048x32768x768": ("mv,dv->md", (2048, 32768), (768, 32768)),
    "lm head weight grad 768x2048x32768": ("md,mv->dv", (2048, 768), (2048, 32768)),
    "mlp up input grad 2048x2048x768": ("mf,df->md", (2048, 2048), (768, 2048)),
    "weight grad 768x2048x2048": ("km,kn->mn", (2048, 768), (2048, 2048)),
    "scores 48x512x64x512": ("bqd,bkd->bqk", (48, 512, 64), (48, 512, 64)),
    "values 48x512x512x64": ("bqk,bkd->bqd", (48, 512, 512), (48, 512, 64)),
    "scores grouped 16x1536x64x512": ("bqd,bkd->bqk", (16, 1536, 64), (16, 512, 64)),
}
CHECKED_ROWS = 16


def flop_count(spec: str, lhs: tuple, rhs: tuple) -> int:
    sizes = dict(zip(spec.split("->")[0].replace(",", ""), lhs + rhs, strict=True))
    return 2 * int(np.prod(list(sizes.values())))


def row_slice(spec: str, lhs: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first CHECKED_ROWS rows of the lhs and of the product, along the lhs's row axis."""
    operands, result = spec.split("->")
    lhs_axes, rhs_axes = operands.split(",")
    row = next(letter for letter in lhs_axes if letter in result and letter not in rhs_axes)
    rows = range(CHECKED_ROWS)
    return np.take(lhs, rows, axis=lhs_axes.index(row)), np.take(out, rows, axis=result.index(row))


def relative_error(spec: str, lhs: np.ndarray, rhs: np.ndarray, out: np.ndarray) -> float:
    lhs_rows, out_rows = row_slice(spec, lhs, out)
    reference = np.einsum(spec, lhs_rows.astype(np.float64), rhs.astype(np.float64))
    return float(np.max(np.abs(out_rows - reference)) / np.max(np.abs(reference)))


def dot_carrier(compiled_text: str) -> str:
    """What carries the dot in the compiled program: a library fusion, a custom call, or a plain dot."""
    for kind in ("__ynn_fusion", "__xnn_fusion", "__onednn_fusion"):
        if kind in compiled_text:
            return kind.strip("_")
    if "custom_call_target=\"__onednn" in compiled_text:
        return "onednn custom call"
    return "dot" if re.search(r"= f32\[[\d,]+\]\{[\d,]+\} dot\(", compiled_text) else "?"


def seconds_per_call(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_compiled(compiled, lhs, rhs):
    return jax.block_until_ready(compiled(lhs, rhs))


def measure_shape(shape: str, settings: list[str], rounds: int, repeats: int, rng) -> None:
    """Print each setting's and torch's rate on one shape, with their errors and dot carriers."""
    spec, lhs_shape, rhs_shape = SHAPES[shape]
    lhs = rng.standard_normal(lhs_shape, np.float32)
    rhs = rng.standard_normal(rhs_shape, np.float32)
    flops = flop_count(spec, lhs_shape, rhs_shape)
    calls, carriers, errors = {}, {}, {}
    jax_lhs, jax_rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    product = jax.jit(functools.partial(jnp.einsum, spec))
    for name in settings:
        compiled = product.lower(jax_lhs, jax_rhs).compile(SETTINGS[name])
        carriers[name] = dot_carrier(compiled.as_text())
        errors[name] = relative_error(spec, lhs, rhs, np.asarray(compiled(jax_lhs, jax_rhs)))
        calls[name] = functools.partial(run_compiled, compiled, jax_lhs, jax_rhs)
    calls["torch"] = functools.partial(torch.einsum, spec, torch.from_numpy(lhs), torch.from_numpy(rhs))
    carriers["torch"] = "torch.einsum"
    errors["torch"] = relative_error(spec, lhs, rhs, calls["torch"]().numpy())
    for call in calls.values():  # warm-up: first-call costs (weight packing, thread start) untimed
        call()
    rates = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            rates[name].append(flops / seconds_per_call(call, repeats) / 1e9)
    medians = {name: statistics.median(figures) for name, figures in rates.items()}
    best = max(settings, key=medians.get)
    print(f"\n{shape} ({flops / 1e9:.1f} GFLOP)")
    for name, figures in rates.items():
        mark = "  <- fastest XLA" if name == best else ""
        print(f"  {name:13s} {medians[name]:7.1f}  [{' '.join(f'{r:.0f}' for r in figures)}]  "
              f"error {errors[name]:.1e}  via {carriers[name]}{mark}")
    print(f"  fastest XLA / torch: {medians[best] / medians['torch']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="calls per round (a round's median)")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    settings = args.settings.split(",")
    shapes = args.shapes.split(",")
    unknown = [s for s in settings if s not in SETTINGS] + [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown settings or shapes {unknown}: expected among {list(SETTINGS)}, {list(SHAPES)}")
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    print(f"fp32, {cores} cores, jax {jax.__version__}, torch {torch.__version__}; GFLOP/s, median over "
          f"{args.rounds} rounds (each the median of {args.repeats} calls), then every round")
    rng = np.random.default_rng(0)
    for shape in shapes:
        measure_shape(shape, settings, args.rounds, args.repeats, rng)


if __name__ == "__main__":
    main()
