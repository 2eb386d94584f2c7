"""Compile a recipe's real train step for a TPU topology on this host, without a TPU, and report its memory.

    python tools/aot_compile.py --config configs/llama3_8b.py --topology v5p:4x4x4 [--num-slices 1]
        [--mesh fsdp=64,data=1] [--unroll] [--dump DIR] [--config.train.microbatches=8 ...]

The TPU compiler (libtpu, the `tpu` extra) runs on the CPU for compile-only devices of the topology:
the run is built on them with the recipe's mesh and rules, nothing is allocated (abstract state
only), and the step is lowered and compiled. Printed per chip: XLA's arguments, outputs,
temporaries and peak against the chip's HBM, the memory estimator's figures beside them with their
ratio, FLOPs (XLA's cost analysis and the model formula), a roofline bound labelled as an estimate,
and the collectives of the optimized program. --unroll unrolls the layer scan so XLA counts every
layer's FLOPs (slower to compile). --dump DIR writes the optimized HLO, the StableHLO and the
serialized executable. A big model on a big slice takes minutes and host memory to compile.

Exit status: 0 when the compiled step fits in HBM, 1 when it does not (the compiler says so), 2 for
a bad recipe, topology or mesh (one line on stderr).
"""

from __future__ import annotations

import argparse

import jax
from absl import flags
from ml_collections import config_flags

from plamo_jax import cli
from plamo_jax.estimate import aot

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (get_config()).", lock_config=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--config", required=True, help="recipe file, e.g. configs/llama3_8b.py")
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:2x2, v5p:4x4x4, v6e:8x8")
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (mesh.dcn_*)")
    parser.add_argument("--mesh", default="", help="mesh sizes to override, e.g. fsdp=8,tensor=2")
    parser.add_argument("--unroll", action="store_true", help="unroll the layer scan for XLA's FLOP count")
    parser.add_argument("--dump", default=None, metavar="DIR", help="write HLO, StableHLO and the executable")
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if not arg.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}; overrides look like --config.train.seq_len=4096")
    cli.check_recipe_flag(["--config", args.config])
    try:
        flags.FLAGS(["aot_compile", f"--config={args.config}", *rest])
    except (AttributeError, KeyError) as error:
        parser.error(f"config override {' '.join(rest)}: unknown key {error}; expected keys of the recipe")
    except (flags.Error, TypeError, ValueError) as error:
        parser.error(f"bad --config={args.config} or override {' '.join(rest)}: {error}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Compile-only TPU devices come from libtpu directly; JAX's own backend stays the CPU, so no
    # TPU runtime is started (there is none here).
    jax.config.update("jax_platforms", "cpu")
    config = _CONFIG.value
    aot.apply_mesh(config, aot.mesh_overrides(args.mesh))
    if args.unroll:
        aot.unroll_layers(config)
    topology = aot.get_topology(args.topology, args.num_slices)
    result = aot.compile_for_topology(config, topology, artifacts=args.dump is not None)
    print(result.report())
    if args.dump is not None:
        for path in aot.write_dump(result, args.dump):
            print(f"wrote {path}")
    return 0 if result.fits else 1


if __name__ == "__main__":
    cli.run(main)
