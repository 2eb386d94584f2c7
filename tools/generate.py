"""Generate text from a checkpoint, raw or as the assistant of a chat (for a quick look at a model).

    python tools/generate.py --checkpoint runs/sft_tiny/checkpoints --chat "二十三を英語で。"
    python tools/generate.py --checkpoint runs/tiny/checkpoints --prompt "日本の" --max-new-tokens 64
        [--temperature 0.8 --top-p 0.95 --seed 0] [--step N] [--no-cache]

The tokenizer and chat template come from the checkpoint's saved config (data.tokenizer,
data.chat_template). A chat reply stops at the template's end of turn or EOS. Dense and MoE models
decode with a KV cache (one forward pass over the prompt, then one token per step); --no-cache
re-runs the whole sequence for every token (the reference the cache is checked against).
"""

from __future__ import annotations

import jax
import numpy as np

from plamo_jax import cli
from plamo_jax.data.tokenizer import encode_to_array, tokenizer_from_config
from plamo_jax.evaluate.generate import Sampling, generator_for
from plamo_jax.posttrain.sft import chat_template, generation_prompt
from plamo_jax.train.checkpoint import load_config, load_params
from plamo_jax.train.run import build_model


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="an Orbax root or one step's directory")
    parser.add_argument("--step", type=int, default=None)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw text to continue")
    prompt.add_argument("--chat", help="a user message; the reply is generated as the assistant")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence per token")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens={args.max_new_tokens}: expected >= 1")
    if args.temperature < 0:
        parser.error(f"--temperature={args.temperature}: expected >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p={args.top_p}: expected a probability mass in (0, 1]")
    config = load_config(args.checkpoint, args.step)
    for axis in config.mesh:
        if axis != "rules":
            config.mesh[axis] = 1  # one device: a quick look, not a server
    tokenizer = tokenizer_from_config(config.data)
    run = build_model(config, devices=jax.devices()[:1])
    params, _ = load_params(args.checkpoint, args.step, shardings=run.setup.param_shardings)
    stop_text = None
    if args.chat is not None:
        template = chat_template(config.data.chat_template, tokenizer)
        message = [{"role": "user", "content": args.chat}]
        prompt_ids = generation_prompt(message, tokenizer, template, bool(config.data.add_bos))
        stop_text = getattr(template, "end_of_turn", None)  # a Jinja template ends turns with EOS
    else:
        bos = [tokenizer.bos_id] if config.data.add_bos else []
        prompt_ids = np.concatenate([bos, encode_to_array(tokenizer, args.prompt)]).astype(np.int32)
    stop_ids = (tokenizer.eos_id,)

    def reached_stop_text(row: int, ids: list[int]) -> bool:
        return stop_text in tokenizer.decode([i for i in ids if i not in stop_ids])

    generator = generator_for(run, params, pad_id=tokenizer.pad_id, cached=False if args.no_cache else None)
    [ids] = generator.generate([prompt_ids], max_new_tokens=args.max_new_tokens, stop_ids=stop_ids,
                               stop=reached_stop_text if stop_text else None,
                               sampling=Sampling(args.temperature, args.top_p, args.seed))
    text = tokenizer.decode([i for i in ids if i not in stop_ids])
    if stop_text is not None and stop_text in text:
        text = text[: text.index(stop_text)]
    print(text)
    return 0


if __name__ == "__main__":
    cli.run(main)
