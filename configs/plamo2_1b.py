"""PLaMo 2 1B shapes (pfnet/plamo-2-1b config.json): 1,291,441,920 parameters, embeddings tied."""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "plamo2_1b"
    m = config.model
    m.attention_impl = "flash"  # long sequences: memory linear in length, masked blocks skipped
    m.family = "hybrid"
    m.vocab_size = 100000
    m.d_model, m.num_layers, m.mlp_dim = 2048, 16, 8192
    m.num_heads, m.num_kv_heads, m.head_dim = 16, 1, 128
    m.qk_norm = True
    m.tie_embeddings = True
    m.rope_theta = 10000.0
    m.norm_eps = 1e-6
    m.dtype = "bfloat16"
    m.mamba_step = 2
    m.ssm_num_heads, m.ssm_head_dim, m.ssm_state_dim = 32, 128, 64
    m.ssm_conv_width, m.ssm_chunk_size = 4, 256
    m.attention_window = 2048
    m.full_attention_layers = ()
    config.train.seq_len = 4096
    config.train.output_dir = "runs/plamo2_1b"
    config.optimizer.no_decay = "norm,bias,embed,A_log,/D"
    return finalize(config)
