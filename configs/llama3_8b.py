"""Llama-3-8B shape (published: 8.03B parameters); bf16 compute, FSDP over all devices by default.

Memory (tools/estimate_memory.py, 64 x H100): 8 microbatches of one 8192-token sequence per device,
full rematerialisation and flash attention estimate 11.4 GiB per device (18.3 GiB with dense
attention's 8k x 8k score tensors), under the 80% rule. On v5p (README, "Booking TPUs"): 10.14 GiB per
chip on 64 chips as shipped; with --config.train.microbatches=1 --config.train.loss_chunk=1024, 32 chips
at 62.41 GiB (66% of HBM).
"""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "llama3_8b"
    m = config.model
    m.attention_impl = "flash"  # long sequences: memory linear in length, masked blocks skipped
    m.vocab_size = 128256
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 4096, 32, 32, 8, 128, 14336
    m.tie_embeddings = False
    m.rope_theta = 500000.0
    m.norm_eps = 1e-5
    m.dtype = "bfloat16"
    m.remat = "full"
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.train.global_batch_size = 512
    config.train.seq_len = 8192
    config.train.microbatches = 8
    config.train.output_dir = "runs/llama3_8b"
    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = 2000
    config.train.steps = 100000
    return finalize(config)
