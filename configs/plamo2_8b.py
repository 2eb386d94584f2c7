"""PLaMo 2 8B shapes: 32 layers of width 4096, 32 query / 4 KV heads, 64 Mamba heads, MLP 16384.

Shapes from llama.cpp's PLaMo 2 converter log and mlx-lm's defaults (the published config.json could
not be read when this was written). Tied embeddings give 9,118,372,864 parameters; an untied head adds
409,600,000, which is what that log's 35.50 GiB fp32 file suggests. Check tie_embeddings against the
published config.json. The rest (norms, state size, window, no-decay list) is as in plamo2_1b.
"""

from plamo_jax.configuration import load_recipe


def get_config():
    config = load_recipe("plamo2_1b")
    config.name = "plamo2_8b"
    m = config.model
    m.d_model, m.num_layers, m.mlp_dim = 4096, 32, 16384
    m.num_heads, m.num_kv_heads, m.head_dim = 32, 4, 128
    m.ssm_num_heads, m.ssm_head_dim = 64, 128
    m.remat = "full"
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.train.global_batch_size = 512
    config.train.microbatches = 4  # with FSDP and full remat: 51.8 GiB per device on 64 x H100
    config.train.output_dir = "runs/plamo2_8b"
    return config
