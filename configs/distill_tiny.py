"""Distil the tiny model (configs/tiny.py, trained by `make train`) into a student of half its width
and depth on the bundled corpus. Another teacher: --config.train.teacher_checkpoint=<checkpoint>
(any family or size with the same vocabulary); a pruned start: --config.checkpoint.init_params=<ckpt>.
"""

from plamo_jax.configuration import load_recipe


def get_config():
    config = load_recipe("tiny")
    config.name = "distill_tiny"
    m = config.model  # tiny: d_model 128, 4 layers, 4 heads (2 KV), head_dim 32, mlp_dim 384
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 64, 2, 2, 1, 32, 192
    t = config.train
    t.objective = "distill"
    t.teacher_checkpoint = "runs/tiny/checkpoints"
    t.distill_temperature = 1.0
    t.distill_alpha = 0.0  # pure distillation: the teacher's distribution is the whole target
    t.output_dir = "runs/distill_tiny"
    return config
