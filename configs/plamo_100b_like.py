"""A 100B-class dense decoder in the PLaMo-100B style: QK-norm, z-loss, GQA, untied embeddings.

PLaMo-100B's exact shape is not given in the sources we could read; this is a Llama-style shape of
~97.5B parameters with a 100k vocabulary (PLaMo 2's tokenizer size), meant for memory planning and
abstract builds (`jax.eval_shape`), and as a starting point for a real run.
On 256 v5p chips (v5p:8x8x4, README "Booking TPUs"): 38.52 GiB per chip as shipped; with
--config.train.microbatches=4, 69.09 GiB (73% of HBM).
"""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "plamo_100b_like"
    m = config.model
    m.attention_impl = "flash"  # long sequences: memory linear in length, masked blocks skipped
    m.vocab_size = 100000
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 8192, 112, 64, 8, 128, 28672
    m.qk_norm = True
    m.tie_embeddings = False
    m.norm_eps = 1e-6
    m.dtype = "bfloat16"
    m.remat = "full"
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 8
    config.train.global_batch_size = 1024
    config.train.microbatches = 8  # 18.9 GiB per device on 512 x H100 (tools/estimate_memory.py)
    config.train.seq_len = 4096
    config.train.z_loss = 1e-4
    config.train.output_dir = "runs/plamo_100b_like"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 2000
    config.train.steps = 500000
    return finalize(config)
