"""Tiny dense model for one CPU: the default of `make train` (bundled Japanese/English corpus, bytes)."""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "tiny"
    m = config.model
    m.vocab_size = 512  # byte tokenizer (259 ids) padded to a multiple of 256
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 128, 4, 4, 2, 32, 384
    m.qk_norm = True
    config.train.steps = 300
    config.train.global_batch_size = 16
    config.train.seq_len = 128
    config.train.output_dir = "runs/tiny"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 20
    config.checkpoint.every_steps = 100
    return finalize(config)
