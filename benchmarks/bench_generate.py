"""Generation tokens/s with the KV cache and without it (the whole buffer re-run per token).

    python benchmarks/bench_generate.py [--config tiny] [--family dense,moe] [--new-tokens 128,1024]
        [--batch 1,8] [--prompt-tokens 32]

A randomly initialised model of the recipe's shape (the MoE variant: the same widths with 8 experts,
top-2); greedy decoding with no stop token, so every row generates exactly --new-tokens tokens. Each
measurement is preceded by an identical run that compiles the programs, so the figures are decoding
alone. The cache makes each step one token's work instead of the whole sequence's: the gap widens
with the number of new tokens (the cache-free cost per token grows with the sequence).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from flax import nnx

from plamo_jax.configuration import load_recipe
from plamo_jax.evaluate.generate import Generator
from plamo_jax.models.decoder import Decoder


def model_config(recipe: str, family: str):
    config = load_recipe(recipe).model
    config.init_std = 0.4  # a random model whose greedy continuations vary
    if family == "moe":
        config.update(family="moe", num_experts=8, num_experts_per_token=2,
                      expert_mlp_dim=max(8, config.mlp_dim // 2), capacity_factor=0.0)
    return config


def tokens_per_second(generator: Generator, prompts, new_tokens: int) -> float:
    generator.generate(prompts, max_new_tokens=new_tokens)  # compiles
    start = time.perf_counter()
    out = generator.generate(prompts, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
    assert all(len(row) == new_tokens for row in out)
    return len(prompts) * new_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="recipe name or file whose model shape is used")
    parser.add_argument("--family", default="dense,moe")
    parser.add_argument("--new-tokens", default="128,1024")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'family':7s} {'batch':>5s} {'new tokens':>10s} {'cached tok/s':>13s} {'cache-free tok/s':>17s} "
          f"{'speed-up':>8s}")
    for family in args.family.split(","):
        config = model_config(args.config, family)
        graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))
        cached = Generator(graphdef, params, cached=True)
        cache_free = Generator(graphdef, params, cached=False)
        for batch in (int(b) for b in args.batch.split(",")):
            prompts = [rng.integers(3, config.vocab_size, args.prompt_tokens).tolist() for _ in range(batch)]
            for new_tokens in (int(n) for n in args.new_tokens.split(",")):
                with_cache = tokens_per_second(cached, prompts, new_tokens)
                without = tokens_per_second(cache_free, prompts, new_tokens)
                print(f"{family:7s} {batch:5d} {new_tokens:10d} {with_cache:13,.0f} {without:17,.0f} "
                      f"{with_cache / without:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
