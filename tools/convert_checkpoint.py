"""Convert between our Orbax checkpoints and Hugging Face safetensors directories.

    python tools/convert_checkpoint.py to-hf --checkpoint DIR [--step N] --out HFDIR --dtype bf16|fp32
    python tools/convert_checkpoint.py from-hf --hf HFDIR --out CKPTDIR [--config RECIPE.py] [--mesh.fsdp=8]

The HF architecture is read from config.json (from-hf) or chosen from the model config (to-hf, or
--format). Peak host memory (RSS) is printed at the end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from plamo_jax import cli
from plamo_jax.configuration import default_config, load_recipe
from plamo_jax.convert import hf
from plamo_jax.convert.formats import FORMATS
from plamo_jax.errors import ConfigError


def recipe_or_defaults(path: str | None):
    return default_config() if path is None else load_recipe(path)


def apply_mesh_overrides(config, overrides: list[str]) -> None:
    """`--mesh.fsdp=8` style overrides of the mesh section (the only section from-hf takes from flags)."""
    for override in overrides:
        key, sep, value = override.removeprefix("--").partition("=")
        section, _, name = key.partition(".")
        if section != "mesh" or not sep or name not in config.mesh or name == "rules":
            raise ConfigError(
                f"unknown argument {override!r}; expected --mesh.<axis>=<size> with axis one of "
                f"{sorted(k for k in config.mesh if k != 'rules')}"
            )
        try:
            setattr(config.mesh, name, int(value))
        except ValueError:
            raise ConfigError(f"{override!r}: expected an integer mesh size") from None


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="Orbax checkpoint -> Hugging Face directory")
    to_hf.add_argument(
        "--checkpoint", required=True, help="checkpoint root (e.g. RUN/checkpoints) or a step dir"
    )
    to_hf.add_argument("--step", type=int, default=None, help="step to export (default: the newest)")
    to_hf.add_argument("--out", required=True)
    to_hf.add_argument("--dtype", default="bf16", choices=sorted(hf.OUTPUT_DTYPES))
    to_hf.add_argument(
        "--format",
        default=None,
        choices=sorted(FORMATS),
        help="HF format (default: chosen from the model config)",
    )
    to_hf.add_argument("--tokenizer", default=None, help="tokenizer directory or file to copy")
    to_hf.add_argument("--max-shard-mb", type=int, default=5 * 1024)
    from_hf = commands.add_parser(
        "from-hf", help="Hugging Face directory -> parameters-only Orbax checkpoint"
    )
    from_hf.add_argument("--hf", required=True)
    from_hf.add_argument("--out", required=True)
    from_hf.add_argument("--config", default=None, help="recipe whose non-model sections to keep")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    if args.command == "to-hf":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        hf.checkpoint_to_hf(
            args.checkpoint,
            args.out,
            step=args.step,
            dtype=args.dtype,
            fmt=args.format,
            tokenizer=args.tokenizer,
            max_shard_bytes=args.max_shard_mb * 2**20,
        )
        size = sum(p.stat().st_size for p in Path(args.out).glob("*.safetensors"))
        print(f"wrote {args.out}: {size / 2**20:.1f} MiB of safetensors")
    else:
        config = recipe_or_defaults(args.config)
        apply_mesh_overrides(config, rest)
        step_dir = hf.hf_to_checkpoint(args.hf, args.out, config)
        print(f"wrote {step_dir}")
    print(f"took {time.perf_counter() - start:.1f} s; peak host memory (RSS) {hf.peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    cli.run(main)
