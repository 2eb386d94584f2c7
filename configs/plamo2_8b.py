"""PLaMo 2 8B shapes: 32 layers of width 4096, 32 query / 4 KV heads, 64 Mamba heads, MLP 16384.

With tied embeddings this is 9,118,372,864 parameters (the published pfnet/plamo-2-8b size, "9.1B");
an untied head (as in the PLaMo 2 translate checkpoints) adds 409,600,000.
"""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "plamo2_8b"
    m = config.model
    m.family = "hybrid"
    m.vocab_size = 100000
    m.d_model, m.num_layers, m.mlp_dim = 4096, 32, 16384
    m.num_heads, m.num_kv_heads, m.head_dim = 32, 4, 128
    m.qk_norm = True
    m.tie_embeddings = True
    m.rope_theta = 10000.0
    m.norm_eps = 1e-6
    m.dtype = "bfloat16"
    m.mamba_step = 2
    m.ssm_num_heads, m.ssm_head_dim, m.ssm_state_dim = 64, 128, 64
    m.ssm_conv_width, m.ssm_chunk_size = 4, 256
    m.attention_window = 2048
    m.full_attention_layers = ()
    config.train.seq_len = 4096
    config.train.global_batch_size = 512
    config.train.microbatches = 4  # with FSDP and full remat: 51.8 GiB per device on 64 x H100
    config.mesh.data, config.mesh.fsdp = 1, -1
    m.remat = "full"
    config.train.output_dir = "runs/plamo2_8b"
    config.optimizer.no_decay = "norm,bias,embed,A_log,/D"
    return finalize(config)
