"""The memory estimator against the TPU compiler: several recipes compiled for TPU topologies here.

Prints one row per recipe and topology: compile seconds, XLA's per-chip arguments, temporaries, their
sum, the compiler's own peak of live bytes (its share of HBM: what the compiler holds against the
chip), the estimator's total and its ratio to that peak, and FLOPs per chip per step from XLA's cost
analysis next to the model formula. Needs libtpu (the `tpu` extra); a big recipe on a big slice takes
minutes and GiBs of host memory (llama3_8b on v5p:4x4x4: 1-4 minutes, 2.6 GiB here).

    python benchmarks/bench_aot.py [--case configs/tiny.py@v5p:2x2x1@data=1,fsdp=4 ...] [--quick]

A case is RECIPE@TOPOLOGY[@MESH[@KEY=VALUE,...]] (KEY a config key such as train.microbatches); by
default the tiny recipes on 4 chips, then the five large recipes on the slices the README's booking
table documents (--quick: the tiny ones only).
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
]
# The README's booking table: each large recipe on a v5p slice (4x4x4 = 64 chips, 8x8x4 = 256), as
# shipped and re-tuned for v5p's 95 GiB where the shipped setting (sized for 80 GB H100s) leaves most
# of the chip idle.
LARGE = [
    "configs/llama3_8b.py@v5p:4x4x4",
    "configs/plamo2_8b.py@v5p:4x4x4",
    "configs/mixtral_8x7b.py@v5p:4x4x4",
    "configs/drop_upcycle_8x.py@v5p:4x4x4",
    "configs/plamo_100b_like.py@v5p:8x8x4",
]
RETUNED = [
    "configs/llama3_8b.py@v5p:4x4x2@@train.microbatches=1,train.loss_chunk=1024",
    "configs/plamo2_8b.py@v5p:4x4x2@@train.microbatches=1,train.loss_chunk=1024",
    "configs/mixtral_8x7b.py@v5p:4x4x4@@train.microbatches=4",
    "configs/drop_upcycle_8x.py@v5p:4x4x4@@train.microbatches=2",
    "configs/plamo_100b_like.py@v5p:8x8x4@@train.microbatches=4",
]
DEFAULT = QUICK + LARGE + RETUNED


def configured(case: str):
    """(config, topology name) of RECIPE@TOPOLOGY[@MESH[@KEY=VALUE,...]]."""
    recipe, topology_name, *rest = case.split("@")
    config = load_recipe(recipe)
    aot.apply_mesh(config, aot.mesh_overrides(rest[0] if rest else ""))
    for override in (part for part in (rest[1] if len(rest) > 1 else "").split(",") if part):
        key, _, value = override.partition("=")
        section, name = key.split(".")
        config[section][name] = type(config[section][name])(value)
    return config, topology_name


def row(case: str) -> str:
    config, topology_name = configured(case)
    result = aot.compile_for_topology(config, aot.get_topology(topology_name))
    fmt = memory.format_bytes
    head = f"{result.config_name:16s} {topology_name:10s} {result.compile_seconds:8.1f}"
    if result.xla is None:
        return f"{head}  does not fit: {result.oom_message}"
    xla = result.xla
    flops = f"{result.xla_flops:10.3e}" if result.xla_flops else f"{'-':>10s}"
    share = xla.peak / result.topology.hbm_bytes
    return (f"{head} {fmt(xla.argument):>11s} {fmt(xla.temp):>11s} {fmt(xla.allocated):>11s} "
            f"{fmt(xla.peak):>11s} {share:5.0%} {fmt(result.estimate.total):>11s} {result.ratio:6.2f} "
            f"{flops} {result.model_flops:10.3e}  {case}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="RECIPE@TOPOLOGY[@MESH[@KEY=VALUE,...]] (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the tiny recipes only")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    cases = args.case or (QUICK if args.quick else DEFAULT)
    print(f"{'recipe':16s} {'topology':10s} {'compile':>8s} {'arguments':>11s} {'temp':>11s} "
          f"{'args+temp':>11s} {'peak':>11s} {'HBM':>5s} {'estimate':>11s} {'ratio':>6s} {'XLA FLOPs':>10s} "
          f"{'model':>10s}  case")
    for case in cases:
        print(row(case), flush=True)


if __name__ == "__main__":
    main()
