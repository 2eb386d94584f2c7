"""Qwen3-MoE (`Qwen3MoeForCausalLM`) <-> our "moe" family, with the on-disk per-expert tensor names.

Mixtral's layout with QK-norm (one RMSNorm weight [head_dim] shared by the heads, as in Qwen3) and an
optional renormalisation of the top-k weights (`norm_topk_prob`); every layer sparse, no sliding window.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from plamo_jax.convert import config_json, llama, mixtral
from plamo_jax.errors import ConversionError

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"
DEFAULT_ROPE_THETA = 10000.0  # Qwen3MoeConfig's default in transformers 5
ROUTER_NAME = "mlp.gate.weight"
EXPERT_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
FIELDS = ("moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
          "use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


def qwen3_moe_expert_name(expert: int, ours: str) -> str:
    return f"mlp.experts.{expert}.{EXPERT_NAMES[ours]}.weight"


def hf_config(model_cfg) -> dict:
    mixtral.check_moe_model(model_cfg, ARCHITECTURE)
    if not model_cfg.qk_norm:
        raise ConversionError(f"{ARCHITECTURE} always applies QK-norm; got model.qk_norm=False "
                                 "(export as MixtralForCausalLM instead)")
    return {
        **mixtral.moe_hf_config(model_cfg, ARCHITECTURE, MODEL_TYPE),
        "moe_intermediate_size": model_cfg.expert_mlp_dim,
        "intermediate_size": model_cfg.expert_mlp_dim,  # width of dense (mlp_only) layers; there are none
        "norm_topk_prob": mixtral.renormalizes_topk(model_cfg),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": model_cfg.num_layers,
    }


def model_overrides(hf_cfg: dict) -> dict:
    where = f"{ARCHITECTURE} config"
    config_json.check_config_keys(hf_cfg, (*llama.BASE_FIELDS, *mixtral.MOE_FIELDS, *FIELDS), where)
    config_json.require_value(hf_cfg, "use_sliding_window", [False], where)
    config_json.require_value(hf_cfg, "mlp_only_layers", [[], None], where)
    config_json.require_value(hf_cfg, "decoder_sparse_step", [1], where)
    layer_types = hf_cfg.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ConversionError(f"{where}: config field layer_types={layer_types!r} cannot be mapped; "
                                 "expected only 'full_attention'")
    if "moe_intermediate_size" not in hf_cfg:
        raise ConversionError(f"{where}: config field moe_intermediate_size is missing")
    overrides = mixtral.moe_model_overrides(hf_cfg, where, DEFAULT_ROPE_THETA)
    overrides.pop("mlp_dim")  # dense-layer width; no layer is dense
    overrides.update(expert_mlp_dim=int(hf_cfg["moe_intermediate_size"]), qk_norm=True,
                     router_renormalize=bool(hf_cfg.get("norm_topk_prob", False)))
    return overrides


def export_tensors(params, model_cfg) -> Iterator[tuple[str, np.ndarray]]:
    hf_config(model_cfg)  # the model must fit the format
    yield from llama.export_embeddings(params, model_cfg)
    yield from llama.export_layers(params, model_cfg, mixtral.non_expert_mappings(qk_norm=True))
    yield from mixtral.export_experts(params, model_cfg, ROUTER_NAME, qwen3_moe_expert_name)


def import_params(read: mixtral.Reader, model_cfg) -> Iterator[tuple[str, np.ndarray]]:
    yield from llama.import_embeddings(read, model_cfg)
    yield from llama.import_layers(read, model_cfg, mixtral.non_expert_mappings(qk_norm=True))
    yield from mixtral.import_experts(read, model_cfg, ROUTER_NAME, qwen3_moe_expert_name)
