"""Grow a checkpoint's vocabulary for a tokenizer that extends its own (Swallow-style continual pre-training).

    python tools/expand_vocab.py --checkpoint ckpt/llama --old-tokenizer llama.model \
        --new-tokenizer llama_ja.model --out ckpt/llama_ja

Each new token's input and output embedding starts as the mean of the embeddings of the pieces the old
tokenizer splits its text into; old rows are unchanged; the vocabulary is padded to a multiple of
--pad-multiple with the mean of all old rows. The written config names the new tokenizer.
"""

from __future__ import annotations

import argparse

from plamo_jax import cli
from plamo_jax.convert.vocab import VocabExpansionReport, expand_vocabulary
from plamo_jax.data.tokenizer import load_tokenizer
from plamo_jax.train.checkpoint import load_params, save_params


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="Orbax checkpoint (root or step directory)")
    parser.add_argument("--step", type=int, default=None, help="step to read (default: the newest)")
    parser.add_argument("--old-tokenizer", required=True, help="the checkpoint's tokenizer (.model / .json)")
    parser.add_argument("--new-tokenizer", required=True, help="the extended tokenizer (.model / .json)")
    parser.add_argument("--out", required=True, help="new parameters-only checkpoint directory")
    parser.add_argument("--pad-multiple", type=int, default=128, help="pad the vocabulary to a multiple")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    old_tokenizer = load_tokenizer(args.old_tokenizer)
    new_tokenizer = load_tokenizer(args.new_tokenizer)
    params, config = load_params(args.checkpoint, step=args.step)
    report = VocabExpansionReport()
    params, model_cfg = expand_vocabulary(params, config.model, old_tokenizer, new_tokenizer,
                                          pad_multiple=args.pad_multiple, report=report)
    config.model.vocab_size = model_cfg.vocab_size
    config.data.tokenizer = args.new_tokenizer
    step_dir = save_params(args.out, params, config)
    print(f"{step_dir}: {report.summary()}")
    return 0


if __name__ == "__main__":
    cli.run(main)
