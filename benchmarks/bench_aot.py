"""The memory estimator against the TPU compiler: several recipes compiled for TPU topologies here.

Prints one row per recipe and topology: compile seconds, XLA's per-chip arguments, temporaries and
peak (and its share of HBM), the estimator's total, their ratio, and FLOPs per chip per step from
XLA's cost analysis next to the model formula. Needs libtpu (the `tpu` extra); a big recipe on a big
slice takes minutes and GiBs of host memory (llama3_8b on v5p:4x4x4: 3 minutes, 2.6 GiB here).

    python benchmarks/bench_aot.py [--case configs/tiny.py@v5p:2x2x1@data=1,fsdp=4 ...] [--quick]

A case is RECIPE@TOPOLOGY[@MESH]; by default the tiny recipes on 4 chips, dense_100m on 8 v5p chips
and llama3_8b on v5p:4x4x4 (--quick leaves llama3_8b out).
"""

from __future__ import annotations

import argparse

import jax

from plamo_jax.configuration import load_recipe
from plamo_jax.estimate import aot, memory

QUICK = [
    "configs/tiny.py@v5p:2x2x1@data=1,fsdp=4",
    "configs/moe_tiny.py@v5p:2x2x1@data=1,fsdp=2,expert=2",
    "configs/plamo2_tiny.py@v5e:2x2@data=1,fsdp=2,tensor=2",
    "configs/dense_100m.py@v5p:2x2x2@data=1,fsdp=8",
]
DEFAULT = QUICK + ["configs/llama3_8b.py@v5p:4x4x4"]


def row(case: str) -> str:
    recipe, topology_name, *mesh = case.split("@")
    config = load_recipe(recipe)
    aot.apply_mesh(config, aot.mesh_overrides(mesh[0] if mesh else ""))
    result = aot.compile_for_topology(config, aot.get_topology(topology_name))
    fmt = memory.format_bytes
    head = f"{result.config_name:14s} {topology_name:10s} {result.compile_seconds:8.1f}"
    if result.xla is None:
        return f"{head}  does not fit: {result.oom_message}"
    xla = result.xla
    flops = f"{result.xla_flops:10.3e}" if result.xla_flops else f"{'-':>10s}"
    share = xla.peak / result.topology.hbm_bytes
    return (f"{head} {fmt(xla.argument):>11s} {fmt(xla.temp):>11s} {fmt(xla.peak):>11s} {share:5.0%} "
            f"{fmt(result.estimate.total):>11s} {result.ratio:6.2f} {flops} {result.model_flops:10.3e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="RECIPE@TOPOLOGY[@MESH] (repeatable)")
    parser.add_argument("--quick", action="store_true", help="leave out llama3_8b on v5p:4x4x4")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    cases = args.case or (QUICK if args.quick else DEFAULT)
    print(f"{'recipe':14s} {'topology':10s} {'compile':>8s} {'arguments':>11s} {'temp':>11s} "
          f"{'XLA peak':>11s} {'HBM':>5s} {'estimate':>11s} {'ratio':>6s} {'XLA FLOPs':>10s} {'model':>10s}")
    for case in cases:
        print(row(case), flush=True)


if __name__ == "__main__":
    main()
