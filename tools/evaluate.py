"""Evaluate a checkpoint: held-out perplexity / bits per byte per corpus, multiple-choice accuracy, and
exact match of generated answers.

    python tools/evaluate.py --checkpoint runs/tiny/checkpoints [--step 300]
        [--perplexity builtin,held_out.jsonl] [--multiple-choice builtin_choice,jcqa.jsonl]
        [--generation builtin_generation,qa.jsonl --max-new-tokens 64]
        [--seq-len 512] [--batch-size 8] [--mesh fsdp=4,tensor=2] [--output results.json]

The tokenizer and model come from the checkpoint's saved config. Corpora take the training
`data.source` forms (JSONL / Parquet / text files, token-shard directories, `builtin`); multiple-
choice files are JSONL {"context", "choices", "answer"} (`builtin_choice`: a bundled two-way set);
generation files JSONL {"prompt", "answer"[, "stop"]}, decoded greedily in batches (with the KV cache
for dense and MoE models) and scored by exact match (`builtin_generation`: the bundled set's answers).
The mesh spreads the model over this host's devices (default: all on the data axis). Prints one
JSON object; bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json

from plamo_jax import cli
from plamo_jax.data.tokenizer import tokenizer_from_config
from plamo_jax.errors import ConfigError
from plamo_jax.evaluate.exact_match import evaluate_exact_match
from plamo_jax.evaluate.generate import generator_for
from plamo_jax.evaluate.multiple_choice import evaluate_multiple_choice
from plamo_jax.evaluate.perplexity import evaluate_perplexity
from plamo_jax.parallel.rules import MESH_AXES
from plamo_jax.train.checkpoint import load_config, load_params
from plamo_jax.train.objectives.lm import CORPUS_FORMATS
from plamo_jax.train.run import build_model


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": -1}
    for item in filter(None, (part.strip() for part in text.split(","))):
        axis, _, size = item.partition("=")
        if axis not in MESH_AXES or not size.lstrip("-").isdigit():
            raise ConfigError(f"--mesh item {item!r}: expected AXIS=SIZE with AXIS one of {MESH_AXES}")
        sizes[axis] = int(size)
    return sizes


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="an Orbax root or one step's directory")
    parser.add_argument("--step", type=int, default=None, help="step to load (default: the newest)")
    parser.add_argument("--perplexity", default="", help="comma-separated corpora (data.source syntax)")
    parser.add_argument("--format", choices=tuple(CORPUS_FORMATS), default="text",
                        help="perplexity corpora: text (every token) or chat (assistant tokens)")
    parser.add_argument("--multiple-choice", default="", help="comma-separated JSONL files or builtin_choice")
    parser.add_argument("--generation", default="", help="comma-separated JSONL files or builtin_generation")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation: most tokens per answer")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's train.seq_len")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass, all devices")
    parser.add_argument("--mesh", default="", help="e.g. fsdp=4,tensor=2; data takes the remaining devices")
    parser.add_argument("--output", default="", help="also write the JSON results to this file")
    args = parser.parse_args(argv)
    if not args.perplexity and not args.multiple_choice and not args.generation:
        parser.error("nothing to evaluate: give --perplexity, --multiple-choice and/or --generation")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens={args.max_new_tokens}: expected >= 1")
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size}: expected >= 1")
    if args.seq_len is not None and args.seq_len < 1:
        parser.error(f"--seq-len={args.seq_len}: expected a positive number of tokens")
    config = load_config(args.checkpoint, args.step)
    config.mesh.update(parse_mesh(args.mesh))
    seq_len = config.train.seq_len if args.seq_len is None else args.seq_len
    config.train.update(seq_len=seq_len, global_batch_size=args.batch_size, microbatches=1)
    run = build_model(config)
    params, _ = load_params(args.checkpoint, args.step, shardings=run.setup.param_shardings)
    results = {"checkpoint": args.checkpoint, "step": args.step, "seq_len": seq_len}
    if args.perplexity:
        results["perplexity"] = evaluate_perplexity(
            run, params, args.perplexity, seq_len=seq_len, batch_size=args.batch_size, data_format=args.format
        )
    if args.multiple_choice:
        tokenizer = tokenizer_from_config(config.data)
        results["multiple_choice"] = [
            evaluate_multiple_choice(run, params, tokenizer, source, seq_len=seq_len,
                                     batch_size=args.batch_size)
            for source in filter(None, (part.strip() for part in args.multiple_choice.split(",")))
        ]
    if args.generation:
        tokenizer = tokenizer_from_config(config.data)
        generator = generator_for(run, params, pad_id=tokenizer.pad_id)
        results["generation"] = [
            evaluate_exact_match(generator, tokenizer, source, add_bos=bool(config.data.add_bos),
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            for source in filter(None, (part.strip() for part in args.generation.split(",")))
        ]
    for entry in results.get("multiple_choice", []):
        del entry["choice_log_probs"]  # per-choice scores are for the API; the report stays short
    for entry in results.get("generation", []):
        entry["first_generations"] = entry.pop("generations")[:3]
    text = json.dumps(results, indent=2, ensure_ascii=False)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    cli.run(main)
