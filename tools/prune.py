"""Structured pruning (Minitron) and depth up-scaling of a checkpoint.

    python tools/prune.py SRC DST --calibration builtin --batches 8 --d-model 96 --mlp-dim 192 \\
        --num-heads 4 --num-kv-heads 2 --num-layers 2           # importance-ranked (any family)
    python tools/prune.py SRC DST --mlp-dim 192 --random-indices --seed 0   # the random baseline
    python tools/prune.py SRC DST --num-experts 4 --calibration corpus.jsonl  # MoE: by router load
    python tools/prune.py SRC DST --ssm-num-heads 2                          # hybrid: SSM heads
    python tools/prune.py SRC DST --grow-layers 2               # depth up-scaling, same logits
    python tools/prune.py SRC DST --grow-width --mlp-dim 768 --num-heads 8 --num-kv-heads 4  # same logits

Importance comes from activations over --batches batches of the calibration corpus (data.source
syntax: `builtin`, JSONL / Parquet / text files, token-shard directories), read with the checkpoint's
tokenizer (see plamo_jax/convert/prune.py for the scores and how GQA groups are kept). DST is a
parameters-only checkpoint with the smaller (or grown) model config, trained from with
checkpoint.init_params and the new shapes, exported like any other; DST/pruning.npz holds every
score and kept index (`score/<scope>/<axis>`, `keep/<scope>/<axis>`), DST/pruning.json a summary.

Growth keeps the function: --grow-layers adds copies of blocks whose residual output projections are
zero; --grow-width takes the target flags as larger sizes (MLP neurons, heads in whole KV groups, SSM
heads), the old weights at their old positions, new entries freshly initialised (--seed) but zero where
they would reach the old outputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from plamo_jax import cli
from plamo_jax.convert import prune
from plamo_jax.convert.merge import require_empty
from plamo_jax.errors import ConfigError
from plamo_jax.train import checkpoint as ckpt
from plamo_jax.train.objectives.lm import LANGUAGE_MODELING

# flag -> model config key of the target shape
TARGET_FLAGS = {"d_model": "d_model", "mlp_dim": "mlp_dim", "num_heads": "num_heads",
                "num_kv_heads": "num_kv_heads", "num_layers": "num_layers", "num_experts": "num_experts",
                "ssm_num_heads": "ssm_num_heads"}


def calibration_batches(config: ml_collections.ConfigDict, source: str, batches: int, batch_size: int,
                        seq_len: int):
    """`batches` batches of `source`, tokenized and packed as the checkpoint's training read its data."""
    data_config = config.data.copy_and_resolve_references()
    data_config.update(source=source, format="text")
    data = LANGUAGE_MODELING.make_iterator(data_config, seq_len=seq_len, global_batch_size=batch_size, seed=0)
    try:
        for _ in range(batches):
            yield next(data)
    finally:
        data.close()


def with_model(config: ml_collections.ConfigDict, model: ml_collections.ConfigDict, suffix: str):
    out = ml_collections.ConfigDict(config.to_dict())
    out.model = model
    out.name = f"{config.get('name', 'model')}_{suffix}"
    return out


def write_record(dst: Path, summary: dict, arrays: dict | None = None) -> None:
    if arrays is not None:
        np.savez(dst / "pruning.npz", **arrays)
    (dst / "pruning.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def shape_of(model: ml_collections.ConfigDict, keys) -> dict:
    return {key: model[key] for key in keys if key in model}


def prune_checkpoint(args, config, params) -> tuple[dict, ml_collections.ConfigDict, dict]:
    target = target_of(args)
    if not target:
        raise ConfigError("no target shape; expected at least one of "
                          + ", ".join("--" + flag.replace("_", "-") for flag in TARGET_FLAGS)
                          + " (or --grow-layers)")
    prune.check_target(config.model, target)
    if all(value == config.model[key] for key, value in target.items()):
        raise ConfigError(f"target {target} is the model's own shape; expected at least one size smaller "
                          "than the model")
    seq_len = args.seq_len or config.train.seq_len
    batches = calibration_batches(config, args.calibration, args.batches, args.batch_size, seq_len)
    scores = prune.calibrate(config.model, params, batches)
    ranked = prune.random_scores(scores, args.seed) if args.random_indices else scores
    keep = prune.choose_indices(config.model, ranked, target)
    small_params, small_model = prune.prune_params(params, config.model, keep, target)
    summary = {"mode": "random" if args.random_indices else "importance", "seed": args.seed,
               "calibration": args.calibration, "batches": args.batches, "batch_size": args.batch_size,
               "seq_len": seq_len, "target": target,
               "kept_blocks": [int(i) for i in keep[(prune.GLOBAL, prune.LAYERS)]]}
    return small_params, small_model, {"summary": summary, "arrays": prune.record_arrays(scores, keep)}


def target_of(args) -> dict[str, int]:
    return {key: getattr(args, flag) for flag, key in TARGET_FLAGS.items() if getattr(args, flag) is not None}


def grow_checkpoint(args, config, params) -> tuple[dict, ml_collections.ConfigDict, dict]:
    if args.grow_layers is not None:
        new_params, new_model, sources = prune.grow_params(params, config.model, args.grow_layers)
        return new_params, new_model, {"mode": "grow_layers", "grow_layers": args.grow_layers,
                                       "block_sources": sources}
    new_params, new_model = prune.grow_width(params, config.model, target_of(args), seed=args.seed)
    return new_params, new_model, {"mode": "grow_width", "target": target_of(args), "seed": args.seed}


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("src", help="checkpoint to prune or grow (an Orbax root or one step's directory)")
    parser.add_argument("dst", help="new directory for the parameters-only checkpoint")
    parser.add_argument("--step", type=int, default=None, help="source step (default: the newest)")
    for flag in TARGET_FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, type=int, default=None,
                            help=f"target model.{TARGET_FLAGS[flag]}")
    parser.add_argument("--calibration", default="builtin", help="calibration corpus (data.source syntax)")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per calibration batch")
    parser.add_argument("--seq-len", type=int, default=None, help="calibration row length (default: "
                                                                   "the checkpoint's train.seq_len)")
    parser.add_argument("--random-indices", action="store_true",
                        help="keep random indices of the same shape (the baseline for importance ranking)")
    parser.add_argument("--seed", type=int, default=0,
                        help="--random-indices: the seed; --grow-width: the new entries' initialisation")
    parser.add_argument("--grow-layers", type=int, default=None,
                        help="depth up-scaling instead: add this many layers, copies of their neighbours "
                             "with zeroed residual outputs (the logits are unchanged)")
    parser.add_argument("--grow-width", action="store_true",
                        help="width growth instead: the target flags are larger sizes (same logits)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 2):
        parser.error(f"--batches {args.batches} --batch-size {args.batch_size} --seq-len {args.seq_len}: "
                     "expected at least 1 batch of 1 row of 2 tokens")
    if args.grow_layers is not None and (args.grow_width or target_of(args)):
        parser.error("--grow-layers grows the depth; it takes no --grow-width or target shape flags")
    if args.grow_width and not target_of(args):
        parser.error("--grow-width needs the larger sizes, e.g. --mlp-dim or --num-heads")
    require_empty(args.dst, "dst")

    start = time.time()
    params, config = ckpt.load_params(args.src, step=args.step)
    dst = Path(args.dst).absolute()
    if args.grow_layers is not None or args.grow_width:
        new_params, new_model, summary = grow_checkpoint(args, config, params)
        record, suffix = {"summary": summary, "arrays": None}, "grown"
    else:
        new_params, new_model, record = prune_checkpoint(args, config, params)
        suffix = "pruned"
    keys = ("d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "num_experts", "ssm_num_heads")
    record["summary"].update(source=str(args.src), before=shape_of(config.model, keys),
                             after=shape_of(new_model, keys))
    out = ckpt.save_params(dst, new_params, with_model(config, new_model, suffix))
    ckpt.carry_assets(args.src, dst)
    write_record(dst, record["summary"], record["arrays"])
    changed = {k: f"{config.model[k]}->{new_model[k]}" for k in keys
               if k in new_model and new_model[k] != config.model[k]}
    print(f"wrote {out} ({record['summary']['mode']}: {changed}; {time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    cli.run(main)
