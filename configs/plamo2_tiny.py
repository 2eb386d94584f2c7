"""Tiny PLaMo 2-style hybrid (Mamba2 + sliding-window attention) for one CPU."""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "plamo2_tiny"
    m = config.model
    m.family = "hybrid"
    m.vocab_size = 512  # byte tokenizer (259 ids) padded to a multiple of 256
    m.d_model, m.num_layers, m.mlp_dim = 128, 4, 384
    m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 32
    m.qk_norm = True  # PLaMo 2 always has per-head QK weights; recorded for readers of the config
    m.norm_eps = 1e-6
    m.mamba_step = 2
    m.ssm_num_heads, m.ssm_head_dim, m.ssm_state_dim = 8, 32, 16  # PLaMo 2 ties ssm_head_dim to head_dim
    m.ssm_conv_width, m.ssm_chunk_size = 4, 32
    m.attention_window = 64  # shorter than seq_len so the window matters; the last layer sees everything
    m.full_attention_layers = (3,)
    config.train.steps = 300
    config.train.global_batch_size = 16
    config.train.seq_len = 128
    config.train.output_dir = "runs/plamo2_tiny"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 20
    config.optimizer.no_decay = "norm,bias,embed,A_log,/D"  # PLaMo 2 / Mamba2: no decay on A_log, D, dt_bias
    config.checkpoint.every_steps = 100
    return finalize(config)
