"""Drop-Upcycling: turn a dense checkpoint into a mixture-of-experts checkpoint.

    python tools/upcycle.py --ratio 0.5 --experts 8 --top-k 2 --seed 0 DENSE_CKPT MOE_CKPT

Every expert starts as a copy of the dense FFN with `ratio` of its neurons re-initialised (whole
neurons unless --per-matrix); attention, norms and embeddings are copied; the router is new.
--ratio 0 is plain upcycling. The MoE config is the dense one with model.family = "moe" and the
expert fields set; the output is a parameters-only checkpoint (train from it with a recipe such as
configs/drop_upcycle_8x.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import ml_collections

from plamo_jax import cli
from plamo_jax.convert.upcycle import upcycle_params
from plamo_jax.models.moe import upcycled_config
from plamo_jax.train.checkpoint import committed_steps, load_params, save_params


def moe_config_from_dense(config: ml_collections.ConfigDict, experts: int, top_k: int,
                          aux_loss: float | None) -> ml_collections.ConfigDict:
    """The dense run config with the model turned into an MoE of `experts` copies of its FFN."""
    moe = ml_collections.ConfigDict(config.to_dict())
    moe.model = upcycled_config(config.model, num_experts=experts, num_experts_per_token=top_k,
                                aux_loss=aux_loss)
    moe.name = f"{config.get('name', 'model')}_upcycled_{experts}x"
    return moe


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("src", help="dense checkpoint (an Orbax root or one step's directory)")
    parser.add_argument("dst", help="new directory for the MoE parameters-only checkpoint")
    parser.add_argument("--ratio", type=float, default=0.5,
                        help="re-initialised share of each expert's neurons")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="dense checkpoint step (default: the newest)")
    parser.add_argument("--aux-loss", type=float, default=None,
                        help="model.moe_aux_loss of the MoE config (default: keep the dense config's)")
    parser.add_argument("--per-matrix", action="store_true",
                        help="draw re-initialised neurons separately for gate, up and down (the released "
                             "script's variant) instead of whole neurons (the paper's description)")
    args = parser.parse_args(argv)
    if args.experts < 1 or not 1 <= args.top_k <= args.experts:
        parser.error(f"--experts {args.experts} --top-k {args.top_k}: expected 1 <= top-k <= experts")
    if not 0.0 <= args.ratio <= 1.0:
        parser.error(f"--ratio {args.ratio}: expected a fraction of neurons in [0, 1]")
    if committed_steps(Path(args.dst).absolute()):
        parser.error(f"{args.dst} already holds a checkpoint; expected a new directory (nothing is "
                     "overwritten)")

    start = time.time()
    dense_params, dense_config = load_params(args.src, step=args.step)
    moe_config = moe_config_from_dense(dense_config, args.experts, args.top_k, args.aux_loss)
    moe_params = upcycle_params(dense_params, dense_config.model, moe_config.model, args.ratio, args.seed,
                                whole_neurons=not args.per_matrix)
    out = save_params(args.dst, moe_params, moe_config)
    print(f"wrote {out}: {args.experts} experts, top-{args.top_k}, ratio {args.ratio}, seed {args.seed} "
          f"({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    cli.run(main)
