"""Data throughput: the tokenize tool (MB of text per second) and the training pipeline (tokens/s).

    python benchmarks/bench_data.py [--corpus_mb 8] [--workers 2] [--seq_len 1024] [--batch 32]

The corpus is the bundled one repeated to --corpus_mb, written to a temporary JSONL file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from plamo_jax.data.config import data_defaults
from plamo_jax.data.sources import read_builtin_documents
from plamo_jax.data.tokenize_job import TokenizeSettings, tokenize_corpus
from plamo_jax.data.tokenizer_training import TokenizerTrainingSettings, train_sentencepiece


def write_corpus(path: Path, megabytes: float) -> int:
    texts = read_builtin_documents()
    lines = [json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts]
    block = "".join(lines).encode("utf-8")
    repeats = max(1, int(megabytes * 1e6 / len(block)))
    path.write_bytes(block * repeats)
    return path.stat().st_size


def bench_tokenize(corpus: Path, output: Path, tokenizer: str, workers: int) -> None:
    settings = TokenizeSettings(tokenizer=tokenizer, shard_bytes=1 << 20)
    result = tokenize_corpus([str(corpus)], output, settings, num_workers=workers, show_progress=False)
    print(
        f"tokenize  {Path(tokenizer).name:>12}  workers={workers}  {result.input_bytes / 1e6:7.1f} MB  "
        f"{result.seconds:6.2f} s  {result.megabytes_per_second:7.2f} MB/s  {result.tokens:,} tokens"
    )


def bench_pipeline(source: str, tokenizer: str, seq_len: int, batch: int, steps: int, threads: int) -> None:
    # Imported here: spawned tokenizer workers re-import this script, and Grain takes seconds to import.
    from plamo_jax.train.objectives.lm import LANGUAGE_MODELING

    make_train_iterator = LANGUAGE_MODELING.make_iterator

    config = data_defaults()
    config.source = source
    config.tokenizer = tokenizer
    config.num_threads = threads
    iterator = make_train_iterator(config, seq_len=seq_len, global_batch_size=batch, seed=0)
    next(iterator)  # start-up (threads, first epoch order) is not throughput
    started = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    seconds = time.perf_counter() - started
    iterator.close()
    tokens = steps * batch * seq_len
    print(
        f"pipeline  {Path(tokenizer).name:>12}  threads={threads}  seq_len={seq_len} batch={batch}  "
        f"{tokens / seconds:12,.0f} tokens/s  ({seconds / steps * 1e3:.1f} ms/step)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus_mb", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--model_seq_len", type=int, default=512, help="~100M model step for comparison")
    parser.add_argument("--model_batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        corpus = scratch / "corpus.jsonl"
        size = write_corpus(corpus, args.corpus_mb)
        print(f"corpus: {size / 1e6:.1f} MB of JSONL (the bundled corpus repeated)")
        model, _ = train_sentencepiece(
            ["builtin"], scratch / "spm", TokenizerTrainingSettings(vocab_size=2000, model_type="bpe")
        )
        for tokenizer in ("byte", str(model)):
            for workers in sorted({0, args.workers}):
                bench_tokenize(
                    corpus, scratch / f"tokens_{Path(tokenizer).stem}_{workers}", tokenizer, workers
                )
        byte_shards = str(scratch / f"tokens_byte_{args.workers}")
        for threads in (1, 2, 4):
            bench_pipeline(byte_shards, "byte", args.seq_len, args.batch, args.steps, threads)
        bench_pipeline(
            str(scratch / f"tokens_spm_{args.workers}"), str(model), args.seq_len, args.batch, args.steps, 2
        )
    bench_model_consumption(args.model_batch, args.model_seq_len)


def bench_model_consumption(batch: int, seq_len: int) -> None:
    """What the pipeline must keep up with: tokens/s that training the ~100M config consumes here."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import measure_training

    config_path = Path(__file__).resolve().parents[1] / "configs" / "dense_100m.py"
    measured = measure_training(str(config_path), batch, seq_len, steps=3)
    print(
        f"training  dense_100m  seq_len={seq_len} batch={batch}  {measured['tokens_per_second']:12,.0f} "
        f"tokens/s consumed ({measured['step_seconds'] * 1e3:.0f} ms/step)"
    )


if __name__ == "__main__":
    main()
