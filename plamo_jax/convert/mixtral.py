"""Mixtral (`MixtralForCausalLM`) <-> our "moe" family, with the on-disk per-expert tensor names.

Attention, norms and embeddings map as in `llama`; the MoE mappings here are shared by `qwen3_moe`.
Ours: router [L, d_model, experts], gate/up [L, experts, d_model, expert_mlp], down [L, experts,
expert_mlp, d_model]. HF: `<moe>.gate.weight` [experts, d_model] and per expert [out, in] matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import ml_collections
import numpy as np

from plamo_jax.convert import config_json, llama
from plamo_jax.errors import ConversionError

ARCHITECTURE = "MixtralForCausalLM"
MODEL_TYPE = "mixtral"
DEFAULT_ROPE_THETA = 1e6  # MixtralConfig's default in transformers 5

Tensors = Iterator[tuple[str, np.ndarray]]
Reader = Callable[[str], np.ndarray]

# our expert parameter -> Mixtral's per-expert name (w1 = gate, w3 = up, w2 = down)
EXPERT_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
# Fields every MoE format writes and `moe_model_overrides` reads (beyond llama.BASE_FIELDS).
MOE_FIELDS = ("num_local_experts", "num_experts", "num_experts_per_tok", "router_aux_loss_coef",
              "output_router_logits")


def check_moe_model(model_cfg: ml_collections.ConfigDict, architecture: str) -> None:
    if model_cfg.num_shared_experts:
        raise ConversionError(f"{architecture} has no shared experts; got model.num_shared_experts="
                                 f"{model_cfg.num_shared_experts}, expected 0")
    if model_cfg.attention_window:
        raise ConversionError(f"{architecture} export expects full attention; got "
                                 f"model.attention_window={model_cfg.attention_window}, expected 0")


def renormalizes_topk(model_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the top-k weights sum to 1 (softmax after top-k = softmax before it + renormalisation)."""
    return bool(model_cfg.router_renormalize or not model_cfg.router_softmax_before_topk)


def moe_hf_config(model_cfg: ml_collections.ConfigDict, architecture: str, model_type: str) -> dict:
    config = llama.base_hf_config(model_cfg, architecture, model_type)
    config.update({
        "intermediate_size": model_cfg.expert_mlp_dim,
        "num_experts_per_tok": model_cfg.num_experts_per_token,
        # transformers writes num_local_experts; mlx-lm's Qwen3-MoE reads num_experts: write both.
        "num_local_experts": model_cfg.num_experts,
        "num_experts": model_cfg.num_experts,
        "router_aux_loss_coef": float(model_cfg.moe_aux_loss),
        "output_router_logits": False,
    })
    return config


def moe_model_overrides(hf_cfg: Mapping, where: str, default_rope_theta: float) -> dict:
    """Our model fields from the fields Mixtral and Qwen3-MoE share."""
    local, plain = hf_cfg.get("num_local_experts"), hf_cfg.get("num_experts")
    if local is not None and plain is not None and local != plain:
        raise ConversionError(f"{where}: config fields num_local_experts={local} and num_experts={plain} "
                                 "disagree")
    num_experts = local if local is not None else plain
    if num_experts is None or "num_experts_per_tok" not in hf_cfg:
        raise ConversionError(f"{where}: config fields num_local_experts (or num_experts) and "
                                 "num_experts_per_tok are required")
    overrides = llama.base_model_overrides(hf_cfg, where, default_rope_theta)
    overrides.update({
        "family": "moe",
        "num_experts": int(num_experts),
        "num_experts_per_token": int(hf_cfg["num_experts_per_tok"]),
        "num_shared_experts": 0,
        "router_softmax_before_topk": True,
        "attention_window": 0,
    })
    if "router_aux_loss_coef" in hf_cfg:
        overrides["moe_aux_loss"] = float(hf_cfg["router_aux_loss_coef"])
    return overrides


def _get(params: Mapping, path: str):
    for key in path.split("/"):
        params = params[key]
    return params


def export_experts(params: Mapping, model_cfg, router_name: str,
                   expert_name: Callable[[int, str], str]) -> Tensors:
    """Router, then every layer and expert of gate, then up, then down (parameter-major, so a lazily
    read checkpoint holds one stacked parameter at a time). expert_name(expert, ours) is the HF name
    inside a layer."""
    router = _get(params, "blocks/mlp/router")
    for layer in range(model_cfg.num_layers):
        yield llama.LAYER.format(layer) + router_name, np.asarray(router[layer]).T
    for ours in ("gate", "up", "down"):
        stacked = _get(params, f"blocks/mlp/{ours}")
        for layer in range(model_cfg.num_layers):
            per_layer = np.asarray(stacked[layer])
            for expert in range(model_cfg.num_experts):
                yield llama.LAYER.format(layer) + expert_name(expert, ours), per_layer[expert].T


def import_experts(read: Reader, model_cfg, router_name: str,
                   expert_name: Callable[[int, str], str]) -> Tensors:
    layers, experts = model_cfg.num_layers, model_cfg.num_experts
    router = np.empty((layers, model_cfg.d_model, experts), np.float32)
    for layer in range(layers):
        router[layer] = read(llama.LAYER.format(layer) + router_name).T
    yield "blocks/mlp/router", router
    width = model_cfg.expert_mlp_dim
    for ours in ("gate", "up", "down"):
        shape = (width, model_cfg.d_model) if ours == "down" else (model_cfg.d_model, width)
        stacked = np.empty((layers, experts, *shape), np.float32)
        for layer in range(layers):
            for expert in range(experts):
                name = llama.LAYER.format(layer) + expert_name(expert, ours)
                value = read(name).T
                if value.shape != shape:
                    raise ConversionError(f"tensor {name} has shape {value.T.shape}; "
                                             f"expected {shape[::-1]}")
                stacked[layer, expert] = value
        yield f"blocks/mlp/{ours}", stacked


def non_expert_mappings(qk_norm: bool) -> list:
    """Norms and attention of each layer, as in llama."""
    return [mapping for mapping in llama.dense_layer_mappings(qk_norm)
            if not mapping[0].startswith("blocks/mlp/")]


# -- the format protocol ---------------------------------------------------------------------------

ROUTER_NAME = "block_sparse_moe.gate.weight"


def mixtral_expert_name(expert: int, ours: str) -> str:
    return f"block_sparse_moe.experts.{expert}.{EXPERT_NAMES[ours]}.weight"


def hf_config(model_cfg) -> dict:
    check_moe_model(model_cfg, ARCHITECTURE)
    if model_cfg.qk_norm:
        raise ConversionError(f"{ARCHITECTURE} has no QK-norm; got model.qk_norm=True "
                                 "(export as Qwen3MoeForCausalLM instead)")
    if not renormalizes_topk(model_cfg):
        raise ConversionError(f"{ARCHITECTURE} always renormalises the top-k weights; got "
                                 "model.router_renormalize=False with model.router_softmax_before_topk=True")
    return {**moe_hf_config(model_cfg, ARCHITECTURE, MODEL_TYPE), "sliding_window": None,
            "router_jitter_noise": 0.0}


def model_overrides(hf_cfg: dict) -> dict:
    where = f"{ARCHITECTURE} config"
    config_json.check_config_keys(hf_cfg, (*llama.BASE_FIELDS, *MOE_FIELDS, "sliding_window",
                                           "router_jitter_noise"),
                         where)
    config_json.require_value(hf_cfg, "sliding_window", [None], where)
    # router_jitter_noise only perturbs inputs while transformers trains; the model's function is unchanged.
    overrides = moe_model_overrides(hf_cfg, where, DEFAULT_ROPE_THETA)
    overrides.update(expert_mlp_dim=overrides.pop("mlp_dim"), qk_norm=False, router_renormalize=True)
    return overrides


def export_tensors(params, model_cfg) -> Tensors:
    hf_config(model_cfg)  # the model must fit the format
    yield from llama.export_embeddings(params, model_cfg)
    yield from llama.export_layers(params, model_cfg, non_expert_mappings(qk_norm=False))
    yield from export_experts(params, model_cfg, ROUTER_NAME, mixtral_expert_name)


def import_params(read: Reader, model_cfg) -> Tensors:
    yield from llama.import_embeddings(read, model_cfg)
    yield from llama.import_layers(read, model_cfg, non_expert_mappings(qk_norm=False))
    yield from import_experts(read, model_cfg, ROUTER_NAME, mixtral_expert_name)
