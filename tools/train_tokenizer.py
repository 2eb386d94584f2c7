"""Train a SentencePiece tokenizer (BPE or unigram, byte fallback) on JSONL / Parquet / text files.

    python tools/train_tokenizer.py --output tokenizers/ja_en --vocab_size 8000 corpus/ builtin
    # then: --config.data.tokenizer=tokenizers/ja_en.model

Special ids: pad 0, bos 1, eos 2, unk 3, then --user_defined_symbols (e.g. "<|im_start|>,<|im_end|>").
Text is not normalised, so decoding gives back exactly the text that was encoded.
"""

from __future__ import annotations

import argparse

from plamo_jax import cli
from plamo_jax.data.tokenizer import SentencePieceTokenizer
from plamo_jax.data.tokenizer_training import MODEL_TYPES, TokenizerTrainingSettings, train_sentencepiece


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("inputs", nargs="+", help="files or directories (.jsonl, .parquet, .txt); 'builtin'")
    parser.add_argument("--output", required=True, help="model prefix: writes <output>.model and .vocab")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--model_type", choices=MODEL_TYPES, default="unigram")
    parser.add_argument("--user_defined_symbols", default="", help="comma-separated special tokens")
    parser.add_argument("--character_coverage", type=float, default=0.9995)
    parser.add_argument("--input_sentence_size", type=int, default=2_000_000, help="lines sampled (0 = all)")
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--on_bad_input", choices=("skip", "fail"), default="skip")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = TokenizerTrainingSettings(
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        user_defined_symbols=tuple(s for s in args.user_defined_symbols.split(",") if s),
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        num_threads=args.num_threads,
        text_field=args.text_field,
        on_bad_input=args.on_bad_input,
    )
    model_path, report = train_sentencepiece(args.inputs, args.output, settings)
    tokenizer = SentencePieceTokenizer(model_path)
    print(f"wrote {model_path} (vocab {tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint()})")
    print(f"input: {report.summary()}")
    return 0


if __name__ == "__main__":
    cli.run(main)
