"""Merge checkpoints of one architecture into one parameters-only checkpoint.

    python tools/merge.py --method linear --weights 0.3,0.7 --out MERGED CKPT_A CKPT_B
    python tools/merge.py --method slerp --t 0.5 --out MERGED CKPT_A CKPT_B
    python tools/merge.py --method task_arithmetic --base BASE --weights 0.5,0.5 --out MERGED A B
    python tools/merge.py --method ties --base BASE --density 0.5 --lambda 1.0 --out MERGED A B
    python tools/merge.py --method dare --base BASE --density 0.7 --seed 0 --out MERGED A B --hf-out HF

Methods: linear, slerp, task_arithmetic, ties, dare, dare_ties (see plamo_jax/convert/merge.py). The
output carries the first model's config and hf_assets; --hf-out also exports it for transformers.
Parameters are read and merged one stacked parameter at a time.
"""

from __future__ import annotations

import time

from plamo_jax import cli
from plamo_jax.convert import hf, merge


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("models", nargs="+", help="checkpoints to merge (Orbax roots or step directories)")
    parser.add_argument("--out", required=True, help="new directory for the merged checkpoint")
    parser.add_argument("--method", required=True, help=", ".join(merge.METHODS))
    parser.add_argument("--base", default=None,
                        help=f"base checkpoint the deltas are taken from ({', '.join(merge.DELTA_METHODS)})")
    parser.add_argument("--weights", default=None, help="comma-separated, one per model (default: equal for "
                                                        "linear, 1 for the delta methods)")
    parser.add_argument("--no-normalize", action="store_true", help="linear: use the weights as given")
    parser.add_argument("--t", type=float, default=0.5, help="slerp: 0 gives the first model, 1 the second")
    parser.add_argument("--density", type=float, default=1.0, help="ties, dare: kept fraction of each delta")
    parser.add_argument("--lambda", dest="scale", type=float, default=1.0,
                        help="delta methods: factor of the merged delta")
    parser.add_argument("--seed", type=int, default=0, help="dare: seed of the drop masks")
    parser.add_argument("--hf-out", default=None, help="also export the merge as a Hugging Face directory")
    parser.add_argument("--hf-dtype", default="bf16", choices=sorted(hf.OUTPUT_DTYPES))
    args = parser.parse_args(argv)
    weights = None if args.weights is None else merge.parse_weights(args.weights)
    spec = merge.MergeSpec(args.method, weights=weights, normalize=not args.no_normalize, t=args.t,
                           density=args.density, scale=args.scale, seed=args.seed)
    if args.hf_out is not None:
        merge.require_empty(args.hf_out, "--hf-out")  # before the merge, not after it

    start = time.time()
    step_dir = merge.merge_checkpoints(args.models, args.out, spec, base=args.base)
    print(f"wrote {step_dir}: {args.method} of {len(args.models)} models ({time.time() - start:.1f} s)")
    if args.hf_out is not None:
        hf.checkpoint_to_hf(step_dir, args.hf_out, dtype=args.hf_dtype)
        print(f"wrote {args.hf_out} (Hugging Face, {args.hf_dtype})")
    return 0


if __name__ == "__main__":
    cli.run(main)
