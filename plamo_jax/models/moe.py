"""The mixture-of-experts family: a linear router, top-k, SwiGLU experts, Drop-Upcycling's config.

Routing (router logits, top-k, auxiliary losses, capacity decisions) runs on the global token set
under GSPMD, so every layout computes the same routing as one device; the experts themselves run in
`models/experts.py` (grouped matmuls, all-to-all expert parallelism). Capacity is decided globally
(GShard priority: first choices first).

Expert weights: gate, up [expert, embed, mlp] and down [expert, mlp, embed] (Mixtral / Qwen3-MoE
SwiGLU experts); the router is [embed, num_experts].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from plamo_jax.errors import ConfigError
from plamo_jax.models import flops
from plamo_jax.models.attention import Attention
from plamo_jax.models.experts import local_moe, sharded_moe
from plamo_jax.models.family import (
    SHARED_ACTIVATION_SHARDS,
    FamilySpec,
    MemoryPart,
    MeshSizes,
    ShardCount,
    require,
    require_divisible,
)
from plamo_jax.models.layers import RMSNorm, SwiGLU, compute_dtype, normal, output_init_std, param
from plamo_jax.parallel import rules as sharding_rules
from plamo_jax.parallel.rules import constrain


def validate(cfg: ml_collections.ConfigDict, sizes: MeshSizes) -> None:
    """The MoE keys; `mlp_dim` is not used (experts have their own width)."""
    require(cfg.num_experts >= 1, "num_experts", cfg.num_experts, "at least 1 expert for family 'moe'")
    require(1 <= cfg.num_experts_per_token <= cfg.num_experts, "num_experts_per_token",
            cfg.num_experts_per_token, f"1 to model.num_experts={cfg.num_experts}")
    require(cfg.expert_mlp_dim >= 1, "expert_mlp_dim", cfg.expert_mlp_dim, "a positive width")
    require(cfg.num_shared_experts >= 0, "num_shared_experts", cfg.num_shared_experts, ">= 0")
    require(cfg.capacity_factor >= 0, "capacity_factor", cfg.capacity_factor, "0 (dropless) or > 0")
    require(cfg.moe_aux_loss >= 0, "moe_aux_loss", cfg.moe_aux_loss, ">= 0")
    require(cfg.router_z_loss >= 0, "router_z_loss", cfg.router_z_loss, ">= 0")
    require_divisible(cfg, "expert_mlp_dim", sizes["tensor"], "the tensor-parallel mesh size mesh.tensor")
    require_divisible(cfg, "num_experts", sizes["expert"], "the expert-parallel mesh size mesh.expert")


def route(logits_TE: jax.Array, num_selected: int, softmax_before_topk: bool,
          renormalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k routing in fp32 -> (weights_TK, experts_TK int32, probs_TE = softmax over all experts).

    softmax_before_topk: weights are the full-softmax probabilities of the chosen experts, divided by
    their sum when `renormalize` (Mixtral, Qwen3-MoE with norm_topk_prob). Otherwise the softmax runs
    over the k chosen logits only (already normalised; `renormalize` changes nothing).
    """
    logits_TE = logits_TE.astype(jnp.float32)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    if softmax_before_topk:
        weights_TK, experts_TK = jax.lax.top_k(probs_TE, num_selected)
        if renormalize:
            weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    else:
        top_logits_TK, experts_TK = jax.lax.top_k(logits_TE, num_selected)
        weights_TK = jax.nn.softmax(top_logits_TK, axis=-1)
    return weights_TK, experts_TK.astype(jnp.int32), probs_TE


def load_balance_loss(probs_TE: jax.Array, experts_TK: jax.Array) -> jax.Array:
    """Switch-Transformer loss E * sum_e f_e * P_e; f_e = share of the T*K assignments sent to expert e,
    P_e = mean router probability of e. Equals 1 for perfectly uniform routing."""
    num_experts = probs_TE.shape[-1]
    assignments_per_expert = jnp.sum(jax.nn.one_hot(experts_TK, num_experts, dtype=jnp.float32), axis=(0, 1))
    fraction_E = assignments_per_expert / experts_TK.size
    mean_prob_E = jnp.mean(probs_TE.astype(jnp.float32), axis=0)
    return num_experts * jnp.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_TE: jax.Array) -> jax.Array:
    """ST-MoE z-loss: mean over tokens of logsumexp(router logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))


def expert_capacity(num_tokens: int, num_selected: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments each expert accepts: ceil(factor * T * K / E)."""
    return max(1, math.ceil(capacity_factor * num_tokens * num_selected / num_experts))


def capacity_keep_mask(experts_TK: jax.Array, num_experts: int, capacity: int) -> jax.Array:
    """[T, K] bool: assignment kept when fewer than `capacity` earlier ones went to the same expert.

    Priority follows GShard: every token's first choice before any second choice, then token order.
    """
    experts_KT = experts_TK.T
    one_hot_KTE = jax.nn.one_hot(experts_KT, num_experts, dtype=jnp.int32)
    # position of each assignment among those for its expert, in (choice rank, token) order
    position_KTE = jnp.cumsum(one_hot_KTE.reshape(-1, num_experts), axis=0).reshape(one_hot_KTE.shape) - 1
    position_KT = jnp.sum(position_KTE * one_hot_KTE, axis=-1)
    return (position_KT < capacity).T


class MoEMLP(nnx.Module):
    """Routed SwiGLU experts (+ optional always-on shared experts); returns (out_BLD, aux)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.dtype = compute_dtype(cfg)
        self.num_experts = cfg.num_experts
        self.num_selected = cfg.num_experts_per_token
        self.softmax_before_topk = cfg.router_softmax_before_topk
        self.renormalize = cfg.router_renormalize
        self.capacity_factor = cfg.capacity_factor
        experts, d_model, width = cfg.num_experts, cfg.d_model, cfg.expert_mlp_dim
        out_std = output_init_std(cfg)
        self.router = param(rngs, normal(cfg.init_std), (d_model, experts), ("embed", None))
        self.gate = param(rngs, normal(cfg.init_std), (experts, d_model, width), ("expert", "embed", "mlp"))
        self.up = param(rngs, normal(cfg.init_std), (experts, d_model, width), ("expert", "embed", "mlp"))
        self.down = param(rngs, normal(out_std), (experts, width, d_model), ("expert", "mlp", "embed"))
        # Assigned once: NNX fixes an attribute as static when it is first set to None.
        self.shared = (SwiGLU.from_config(cfg, cfg.num_shared_experts * width, rngs=rngs)
                       if cfg.num_shared_experts else None)

    def __call__(self, x_BLD: jax.Array, dropless: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """dropless: ignore model.capacity_factor (decoding with a KV cache)."""
        batch, length, d_model = x_BLD.shape
        x = x_BLD.astype(self.dtype)
        # Router in fp32: small logit differences decide the expert.
        logits_BLE = jnp.einsum("bld,de->ble", x.astype(jnp.float32), self.router[...])
        logits_TE = logits_BLE.reshape(batch * length, self.num_experts)
        weights_TK, experts_TK, probs_TE = route(logits_TE, self.num_selected, self.softmax_before_topk,
                                                 self.renormalize)
        capacity = None
        keep_TK = jnp.ones(experts_TK.shape, bool)
        if self.capacity_factor > 0 and not dropless:
            capacity = expert_capacity(batch * length, self.num_selected, self.num_experts,
                                       self.capacity_factor)
            keep_TK = capacity_keep_mask(experts_TK, self.num_experts, capacity)
        gate, up, down = (w[...].astype(self.dtype) for w in (self.gate, self.up, self.down))
        to_BLK = lambda a: a.reshape(batch, length, self.num_selected)
        if sharding_rules.active_mesh() is None:
            out = local_moe(x.reshape(-1, d_model), experts_TK, weights_TK, keep_TK, gate, up, down)
            out_BLD = out.reshape(batch, length, d_model)
        else:
            out_BLD = sharded_moe(x, to_BLK(experts_TK), to_BLK(weights_TK), to_BLK(keep_TK), gate, up, down,
                                  capacity=capacity)
        out_BLD = constrain(out_BLD.astype(self.dtype), ("act_batch", "act_length", "act_embed"))
        if self.shared is not None:
            out_BLD = out_BLD + self.shared(x)
        kept_per_expert = jnp.sum(jax.nn.one_hot(jnp.where(keep_TK, experts_TK, -1), self.num_experts,
                                                 dtype=jnp.float32), axis=(0, 1))
        aux = {
            "load_balance_loss": load_balance_loss(probs_TE, experts_TK),
            "router_z_loss": router_z_loss(logits_TE),
            "tokens_per_expert": kept_per_expert,
            # the busiest expert's load over the mean load: 1 when balanced, num_experts at worst
            "max_expert_load_ratio": jnp.max(kept_per_expert) / jnp.maximum(jnp.mean(kept_per_expert), 1e-9),
            "dropped_fraction": 1.0 - jnp.mean(keep_TK.astype(jnp.float32)),
        }
        return out_BLD, aux


class MoEBlock(nnx.Module):
    """Pre-norm block like DenseBlock (same attn_norm / attn / mlp_norm names) with an MoE MLP."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.attn = Attention.from_config(cfg, qk_norm="shared" if cfg.qk_norm else "none", rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mlp = MoEMLP(cfg, rngs=rngs)

    def __call__(self, x_BLD, segment_ids_BL, positions_BL, block_index):
        del block_index  # every MoE layer is the same
        attended, max_logit = self.attn.attend(self.attn_norm(x_BLD), segment_ids_BL, positions_BL)
        x_BLD = x_BLD + attended
        mlp_out_BLD, aux = self.mlp(self.mlp_norm(x_BLD))
        return x_BLD + mlp_out_BLD, {**aux, "max_attention_logit": max_logit}

    def init_cache(self, batch: int, max_length: int) -> dict:
        return self.attn.init_cache(batch, max_length)

    def extend(self, x_BTD, positions_BT, start, cache, key_valid_BS, block_index):
        """The block on T new tokens with the attention's KV cache; the experts drop no token."""
        del block_index
        attended, cache = self.attn.extend(self.attn_norm(x_BTD), positions_BT, start, cache, key_valid_BS)
        x_BTD = x_BTD + attended
        mlp_out_BTD, _ = self.mlp(self.mlp_norm(x_BTD), dropless=True)
        return x_BTD + mlp_out_BTD, cache


# ----------------------------------------------------------------------------------- the family spec


def auxiliary_losses(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    return {"load_balance_loss": cfg.moe_aux_loss, "router_z_loss": cfg.router_z_loss}


def forward_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """Attention, the router, and the k routed plus the shared experts each token uses."""
    experts_used = cfg.num_experts_per_token + cfg.num_shared_experts
    per_layer = flops.attention_flops_per_token(cfg, seq_len, cfg.attention_window)
    per_layer += 2 * cfg.d_model * cfg.num_experts
    per_layer += experts_used * flops.swiglu_flops_per_token(cfg.d_model, cfg.expert_mlp_dim)
    return cfg.num_layers * per_layer + flops.lm_head_flops_per_token(cfg)


def dispatch_bytes(cfg: ml_collections.ConfigDict, shards: ShardCount, tokens_per_device: int) -> float:
    """All-to-all buffers of one MoE block beyond the single-shard computation a trace covers.

    Each device sends a [shards, slots, d_model] buffer, receives one, runs the experts on every
    received row and sends the results back (`experts.expert_parallel_moe`).
    """
    expert_shards = shards("expert")
    if expert_shards == 1:
        return 0.0
    dtype_bytes = jnp.dtype(cfg.dtype).itemsize
    assignments = slots = tokens_per_device * cfg.num_experts_per_token
    if cfg.capacity_factor > 0:
        global_tokens = tokens_per_device * shards("act_batch") * shards("act_length")
        capacity = expert_capacity(global_tokens, cfg.num_experts_per_token, cfg.num_experts,
                                   cfg.capacity_factor)
        slots = min(slots, capacity * (cfg.num_experts // expert_shards))
    buffers = 3 * expert_shards * slots * cfg.d_model  # send, receive, send back
    extra_rows = expert_shards * slots - assignments  # rows the experts process beyond this device's own
    expert_width = -(-cfg.expert_mlp_dim // shards("act_mlp"))
    return float(dtype_bytes * (buffers + extra_rows * (2 * cfg.d_model + 3 * expert_width)))


def default_hf_format(cfg: ml_collections.ConfigDict) -> str:
    return "qwen3_moe" if cfg.qk_norm else "mixtral"


MOE = FamilySpec(
    name="moe",
    block=MoEBlock,
    validate=validate,
    architecture_keys=("qk_norm", "num_experts", "num_shared_experts", "expert_mlp_dim",
                       "num_experts_per_token", "router_softmax_before_topk", "router_renormalize"),
    forward_flops_per_token=forward_flops_per_token,
    auxiliary_losses=auxiliary_losses,
    activation_shards={**SHARED_ACTIVATION_SHARDS, "expert_mlp_dim": "act_mlp"},
    memory_part=MemoryPart("MoE router and experts", "MoE MLP", lambda block: [(block.mlp, _mlp_output)]),
    dispatch_bytes=dispatch_bytes,
    hf_formats=("mixtral", "qwen3_moe"),
    default_hf_format=default_hf_format,
    rows_independent=False,  # routing statistics and expert capacity span the whole token set
    cached_decoding=True,
)


def _mlp_output(mlp: MoEMLP, x_BLD: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
    return mlp(x_BLD)[0]


# ---------------------------------------------------------------------------------- Drop-Upcycling


def upcycled_config(dense_cfg: ml_collections.ConfigDict, *, num_experts: int, num_experts_per_token: int,
                    aux_loss: float | None = None) -> ml_collections.ConfigDict:
    """The MoE model config whose experts start as copies of a dense model's FFN (tools/upcycle.py).

    Softmax before top-k with renormalisation: with no neuron re-initialised the MoE computes
    exactly the dense FFN.
    """
    moe = ml_collections.ConfigDict(dense_cfg.to_dict())
    moe.update(family="moe", num_experts=num_experts, num_experts_per_token=num_experts_per_token,
               expert_mlp_dim=dense_cfg.mlp_dim, num_shared_experts=0, capacity_factor=0.0,
               router_softmax_before_topk=True, router_renormalize=True)
    if aux_loss is not None:
        moe.moe_aux_loss = aux_loss
    check_upcycle_compatible(dense_cfg, moe)
    return moe


# Model fields that must agree between the dense source and the MoE target.
UPCYCLE_SHARED_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                         "qk_norm", "tie_embeddings")


def check_upcycle_compatible(dense_cfg: ml_collections.ConfigDict,
                             moe_cfg: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first model field that keeps the dense model from being upcycled."""
    if dense_cfg.family != "dense":
        raise ConfigError(f"dense config: model.family={dense_cfg.family!r}, expected 'dense'")
    if moe_cfg.family != "moe":
        raise ConfigError(f"MoE config: model.family={moe_cfg.family!r}, expected 'moe'")
    for field in UPCYCLE_SHARED_FIELDS:
        if dense_cfg[field] != moe_cfg[field]:
            raise ConfigError(f"model.{field} differs: dense {dense_cfg[field]!r}, MoE {moe_cfg[field]!r}")
    if moe_cfg.expert_mlp_dim != dense_cfg.mlp_dim:
        raise ConfigError(
            f"MoE config: model.expert_mlp_dim={moe_cfg.expert_mlp_dim}, expected the dense "
            f"model.mlp_dim={dense_cfg.mlp_dim} (each expert starts as a copy of the dense FFN)"
        )
    if moe_cfg.num_shared_experts:
        raise ConfigError(f"MoE config: model.num_shared_experts={moe_cfg.num_shared_experts}; upcycling "
                          "makes routed experts only, expected 0")
    if moe_cfg.num_experts < 1:
        raise ConfigError(f"MoE config: model.num_experts={moe_cfg.num_experts}, expected >= 1")
