"""PLaMo 2 8B shapes: 32 layers of width 4096, 32 query / 4 KV heads, 64 Mamba heads, MLP 16384.

Shapes from llama.cpp's PLaMo 2 converter log and mlx-lm's defaults; the rest (norms, state size,
window, no-decay list) is as in plamo2_1b. Tied embeddings: 9,118,372,864 parameters. The published
config.json was not readable here, so the tie was settled by file sizes reported for the downloaded
pfnet/plamo-2-8b: a 34 G fp32 snapshot and a 9.1 G Q8_0 GGUF, against 33.97 GiB / 9.02 GiB tied and
35.49 GiB / 9.43 GiB with an untied head (the same report gives 4.9 G / 1.3 G for the 1B, whose tied
count 1,291,441,920 is 4.81 GiB / 1.28 GiB). The 35.50 GiB fp32 GGUF in llama.cpp's PLaMo 2 pull request
(100,032 tokens) fits an untied head over a padded vocabulary instead: a different checkpoint.
On v5p (README, "Booking TPUs"): 10.84 GiB per chip on 64 chips as shipped; with
--config.train.microbatches=1 --config.train.loss_chunk=1024, 32 chips at 63.79 GiB (67% of HBM).
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
    config.train.microbatches = 4  # FSDP, full remat, flash: 12.4 GiB per device on 64 x H100
    config.train.output_dir = "runs/plamo2_8b"
    return config
