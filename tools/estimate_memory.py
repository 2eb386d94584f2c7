"""Per-device memory of a training step: breakdown, total, and whether it fits under 80% of the device.

    python tools/estimate_memory.py --config configs/llama3_8b.py --devices 64 [--device h100]
        [--device-memory-gib 80] [--config.train.microbatches=8 ...] [--compare-xla]

--compare-xla also compiles the real train step abstractly on this host's CPU with `--devices`
simulated devices (nothing is allocated) and prints the estimate next to XLA's memory analysis.
The tool sets XLA_FLAGS for that; a big model on many devices takes minutes and host memory to compile.
Exit status: 0 when the estimate fits under 80% of device memory, 1 when not, 2 for a bad config
(one line on stderr).
"""

from __future__ import annotations

import argparse
import os

import jax
from absl import flags
from ml_collections import config_flags

from plamo_jax import cli
from plamo_jax.estimate import memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (get_config()).", lock_config=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--config", required=True, help="recipe file, e.g. configs/llama3_8b.py")
    parser.add_argument("--devices", type=int, required=True, help="number of devices of the run")
    parser.add_argument("--device", default="h100", help=f"one of {sorted(memory.DEVICE_MEMORY_GIB)}")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="device memory in GiB (overrides the --device table)")
    parser.add_argument("--compare-xla", action="store_true",
                        help="compile the step on simulated CPU devices and compare with XLA's analysis")
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if not arg.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}; overrides look like --config.train.seq_len=4096")
    cli.check_recipe_flag(["--config", args.config])
    if args.devices < 1:
        parser.error(f"--devices={args.devices}: expected a positive number of devices")
    try:
        flags.FLAGS(["estimate_memory", f"--config={args.config}", *rest])
    except (AttributeError, KeyError) as error:
        parser.error(f"config override {' '.join(rest)}: unknown key {error}; expected keys of the recipe")
    except (flags.Error, TypeError, ValueError) as error:
        parser.error(f"bad --config={args.config} or override {' '.join(rest)}: {error}")
    return args


def use_simulated_devices(count: int) -> None:
    """Ask XLA for `count` CPU devices; must run before JAX starts its backends."""
    flag = f"--xla_force_host_platform_device_count={count}"
    existing = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in existing:
        os.environ["XLA_FLAGS"] = f"{existing} {flag}".strip()
    jax.config.update("jax_platforms", "cpu")  # JAX read JAX_PLATFORMS when it was imported


def comparison_table(estimate: memory.MemoryEstimate, xla: memory.XlaMemory) -> str:
    state = sum(estimate.bytes_of(name) for name in ("parameters", "optimizer states", "input batch"))
    rows = [
        ("state + batch arguments", state, xla.argument),
        ("peak (arguments + temporaries)", estimate.total, xla.peak),
    ]
    lines = [f"{'per device':32s} {'estimate':>12s} {'XLA':>12s} {'ratio':>7s}"]
    for name, ours, theirs in rows:
        lines.append(f"{name:32s} {memory.format_bytes(ours):>12s} {memory.format_bytes(theirs):>12s} "
                     f"{ours / max(theirs, 1):7.3f}")
    lines.append(f"XLA: argument {xla.argument} B, output {xla.output} B (aliased {xla.alias} B), "
                 f"temp {xla.temp} B")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.compare_xla:
        use_simulated_devices(args.devices)
    config = _CONFIG.value
    estimate = memory.estimate_memory(config, args.devices, device=args.device,
                                      device_memory_gib=args.device_memory_gib, host_kernels=args.compare_xla)
    print(estimate.table())
    if args.compare_xla:
        if jax.device_count() < args.devices:
            cli.fail(f"--compare-xla needs {args.devices} devices but JAX sees {jax.device_count()}; "
                     "unset XLA_FLAGS or set --xla_force_host_platform_device_count to at least that")
        xla = memory.xla_memory(config, jax.devices()[: args.devices])
        print()
        print(f"compared with XLA's memory analysis of the compiled step ({jax.devices()[0].platform}; the "
              "estimate traces the kernels this host compiles):")
        print(comparison_table(estimate, xla))
    return 0 if estimate.fits else 1


if __name__ == "__main__":
    cli.run(main)
