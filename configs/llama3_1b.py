"""Llama-3.2-1B shape (meta-llama/Llama-3.2-1B config.json: 1.24B parameters, embeddings tied).

The ~1B dense model of benchmarks/gpu_check.sh, which trains it on one H200 at 4 x 2048 tokens per step
with no sharding and no rematerialisation (the memory estimator: 47.0 GiB); the recipe's 32 rows are
4 per device on 8. attention_impl=auto: cuDNN's fused attention on an NVIDIA GPU, dense scores
elsewhere at this length.
"""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "llama3_1b"
    m = config.model
    m.attention_impl = "auto"
    m.vocab_size = 128256
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2048, 16, 32, 8, 64, 8192
    m.tie_embeddings = True
    m.rope_theta = 500000.0
    m.norm_eps = 1e-5
    m.dtype = "bfloat16"
    config.train.global_batch_size = 32
    config.train.seq_len = 2048
    config.train.output_dir = "runs/llama3_1b"
    config.optimizer.learning_rate = 3e-4
    return finalize(config)
