"""SFT of the default tiny model on the bundled chat set: run `make train` first, then
`python launch/train.py --config configs/sft_tiny.py`. Only assistant tokens are learned; whole
conversations are packed into rows (data.packing=fit) and never split.
"""

from plamo_jax.configuration import load_recipe


def get_config():
    config = load_recipe("tiny")
    config.name = "sft_tiny"
    config.data.source = "builtin_chat"  # or a JSONL file / directory of {"messages": [...]} records
    config.data.format = "chat"
    config.data.chat_template = "plain"  # the byte tokenizer has no chat special tokens
    config.data.packing = "fit"
    config.checkpoint.init_params = "runs/tiny/checkpoints"  # the newest step of the default run
    config.train.steps = 200
    config.train.output_dir = "runs/sft_tiny"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 10
    return config
