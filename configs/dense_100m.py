"""~100M-parameter dense decoder (GPT-2-small width, GQA, QK-norm, SentencePiece-sized vocabulary)."""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "dense_100m"
    m = config.model
    m.vocab_size = 32768
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 768, 12, 12, 4, 64, 2048
    m.qk_norm = True
    config.train.steps = 20000
    config.train.global_batch_size = 256
    config.train.seq_len = 1024
    config.train.output_dir = "runs/dense_100m"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 1000
    config.checkpoint.every_steps = 1000
    return finalize(config)
