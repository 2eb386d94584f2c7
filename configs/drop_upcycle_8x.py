"""Drop-Upcycling paper setting: 8 experts, top-2, from the 3.7B dense model (llm-jp-3-3.7b shape).

Total 18.6B parameters, 5.9B active per token. Build the starting checkpoint with
`tools/upcycle.py --ratio 0.5 --experts 8 --top-k 2 DENSE_CKPT MOE_CKPT` (re-initialisation ratio 0.5,
whole neurons), then train with this recipe: load-balancing loss 0.02, AdamW (0.9, 0.95), eps 1e-8,
weight decay 0.1, clipping 1.0, learning rate 2e-4 -> 2e-5 cosine after 2000 warm-up steps.
On 64 v5p chips (README, "Booking TPUs"): 15.24 GiB per chip as shipped; with
--config.train.microbatches=2, 50.78 GiB (53% of HBM).
"""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "drop_upcycle_8x"
    model = config.model
    model.attention_impl = "flash"  # long sequences: memory linear in length, masked blocks skipped
    model.family = "moe"
    model.vocab_size = 99584
    model.d_model = 3072
    model.num_layers = 28
    model.num_heads = 24
    model.num_kv_heads = 24
    model.head_dim = 128
    model.expert_mlp_dim = 8192  # every expert starts as a copy of the dense FFN
    model.num_experts = 8
    model.num_experts_per_token = 2
    model.router_softmax_before_topk = True
    model.router_renormalize = True
    model.moe_aux_loss = 0.02
    model.tie_embeddings = False
    model.rope_theta = 10000.0
    model.norm_eps = 1e-5
    model.dtype = "bfloat16"
    model.remat = "full"

    optimizer = config.optimizer
    optimizer.learning_rate = 2e-4
    optimizer.min_lr_ratio = 0.1  # 2e-5 at the end
    optimizer.schedule = "cosine"
    optimizer.warmup_steps = 2000
    optimizer.b1 = 0.9
    optimizer.b2 = 0.95
    optimizer.eps = 1e-8
    optimizer.weight_decay = 0.1
    optimizer.clip_norm = 1.0

    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.expert = 8
    config.train.seq_len = 4096
    config.train.global_batch_size = 1024
    config.train.microbatches = 16  # 17.0 GiB per device on 64 x H100 (tools/estimate_memory.py)
    config.train.output_dir = "runs/drop_upcycle_8x"
    return finalize(config)
