"""Tokenize JSONL / Parquet / plain-text corpora into token shards the training pipeline reads.

    python tools/tokenize_corpus.py --output data/ja_tokens --tokenizer byte corpus/*.jsonl
    # then: --config.data.source=data/ja_tokens (or data/ja_tokens:0.7,data/en_tokens:0.3)

Re-running with the same inputs and settings does nothing; an interrupted run resumes, reusing the
shards it finished. Bad records are counted and reported (or, with --on_bad_input=fail, stop the run).
"""

from __future__ import annotations

import argparse

from plamo_jax import cli
from plamo_jax.data.tokenize_job import TokenizeSettings, tokenize_corpus


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("inputs", nargs="+", help="files or directories (.jsonl, .parquet, .txt); 'builtin'")
    parser.add_argument("--output", required=True, help="output directory (manifest.json + shards)")
    parser.add_argument("--tokenizer", default="byte", help="byte | SentencePiece .model | tokenizer.json")
    parser.add_argument("--bos_token", default="", help="Hugging Face tokenizers: BOS token string")
    parser.add_argument("--eos_token", default="", help="Hugging Face tokenizers: EOS token string")
    parser.add_argument("--pad_token", default="", help="Hugging Face tokenizers: PAD token string")
    parser.add_argument("--text_field", default="text", help="JSONL key / Parquet column of the text")
    parser.add_argument("--no_bos", action="store_true", help="do not prepend BOS (EOS is always appended)")
    parser.add_argument("--shard_mb", type=float, default=64.0, help="text megabytes per shard")
    parser.add_argument("--workers", type=int, default=4, help="tokenizer processes (0 = in this process)")
    parser.add_argument("--on_bad_input", choices=("skip", "fail"), default="skip")
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = TokenizeSettings(
        tokenizer=args.tokenizer,
        bos_token=args.bos_token,
        eos_token=args.eos_token,
        pad_token=args.pad_token,
        text_field=args.text_field,
        add_bos=not args.no_bos,
        shard_bytes=max(1, int(args.shard_mb * 1e6)),
        on_bad_input=args.on_bad_input,
    )
    result = tokenize_corpus(
        args.inputs, args.output, settings, num_workers=args.workers, show_progress=not args.no_progress
    )
    if result.up_to_date:
        print(f"{result.output_dir}: up to date ({result.documents} documents, {result.tokens} tokens)")
    else:
        print(
            f"{result.output_dir}: {result.documents} documents, {result.tokens} tokens in {result.shards} "
            f"shards ({result.reused_shards} reused), {result.megabytes_per_second:.2f} MB/s"
        )
    print(f"input: {result.read_report.summary()}")
    return 0


if __name__ == "__main__":
    cli.run(main)
