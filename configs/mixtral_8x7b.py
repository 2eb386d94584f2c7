"""Mixtral-8x7B shape: 46.7B parameters in total, 12.9B active per token (8 experts, top-2).

On 64 v5p chips (README, "Booking TPUs"): 26.93 GiB per chip as shipped; with
--config.train.microbatches=4, 51.29 GiB (54% of HBM) and a quarter of the FSDP weight gathers.
"""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "mixtral_8x7b"
    model = config.model
    model.attention_impl = "flash"  # long sequences: memory linear in length, masked blocks skipped
    model.family = "moe"
    model.vocab_size = 32000
    model.d_model = 4096
    model.num_layers = 32
    model.num_heads = 32
    model.num_kv_heads = 8
    model.head_dim = 128
    model.num_experts = 8
    model.num_experts_per_token = 2
    model.expert_mlp_dim = 14336
    model.router_softmax_before_topk = True
    model.router_renormalize = True
    model.tie_embeddings = False
    model.rope_theta = 1e6
    model.norm_eps = 1e-5
    model.dtype = "bfloat16"
    model.remat = "full"
    config.mesh.fsdp = -1
    config.mesh.data = 1
    config.mesh.expert = 8
    config.train.seq_len = 4096
    config.train.global_batch_size = 1024
    config.train.microbatches = 16  # 31.4 GiB per device on 64 x H100 (tools/estimate_memory.py)
    config.train.output_dir = "runs/mixtral_8x7b"
    return finalize(config)
