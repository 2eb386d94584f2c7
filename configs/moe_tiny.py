"""A tiny mixture-of-experts decoder that trains on CPU in minutes (8 experts, top-2)."""

from plamo_jax.configuration import default_config, finalize


def get_config():
    config = default_config()
    config.name = "moe_tiny"
    model = config.model
    model.family = "moe"
    model.d_model = 128
    model.num_layers = 2
    model.num_heads = 4
    model.num_kv_heads = 2
    model.head_dim = 32
    model.num_experts = 8
    model.num_experts_per_token = 2
    model.expert_mlp_dim = 96  # top-2 of 96 = the active width of a 192-wide dense MLP
    model.moe_aux_loss = 0.01
    model.router_z_loss = 0.001
    config.train.output_dir = "runs/moe_tiny"
    return finalize(config)
