"""DPO of the SFT'd tiny model on the bundled preference pairs (the answer in the asked language
and form is chosen over a right answer that ignores it): run `make train`, then
configs/sft_tiny.py, then this. The reference model is the
frozen starting checkpoint (checkpoint.init_params).
"""

from plamo_jax.configuration import load_recipe


def get_config():
    config = load_recipe("sft_tiny")
    config.name = "dpo_tiny"
    config.data.source = "builtin_preference"  # or a JSONL file of {"prompt", "chosen", "rejected"}
    config.data.format = "preference"
    config.train.objective = "dpo"
    config.train.dpo_beta = 0.1
    config.checkpoint.init_params = "runs/sft_tiny/checkpoints"
    config.train.steps = 100
    config.train.output_dir = "runs/dpo_tiny"
    config.optimizer.learning_rate = 1e-4  # higher rates push the chosen answers down too (DPO displacement)
    return config
