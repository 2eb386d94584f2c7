"""Generate text from a checkpoint, raw or as the assistant of a chat (for a quick look at a model).

    python tools/generate.py --checkpoint runs/sft_tiny/checkpoints --chat "二十三を英語で。"
    python tools/generate.py --checkpoint runs/tiny/checkpoints --prompt "日本の" --max-new-tokens 64
        [--temperature 0.8 --top-p 0.95 --seed 0] [--step N]

The tokenizer and chat template come from the checkpoint's saved config (data.tokenizer,
data.chat_template). A chat reply stops at the template's end of turn or EOS.
"""

from __future__ import annotations

import jax
import numpy as np

from plamo_jax import cli
from plamo_jax.data.tokenizer import encode_to_array, tokenizer_from_config
from plamo_jax.evaluate.generate import generate
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
    graphdef = run.setup.graphdef
    stop_ids = (tokenizer.eos_id,)
    ids = generate(graphdef, params, prompt_ids, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    text = tokenizer.decode([i for i in ids if i not in stop_ids])
    if stop_text is not None and stop_text in text:
        text = text[: text.index(stop_text)]
    print(text)
    return 0


if __name__ == "__main__":
    cli.run(main)
