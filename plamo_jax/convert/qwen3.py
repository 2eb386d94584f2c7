"""Qwen3 (`Qwen3ForCausalLM`) <-> our dense decoder with QK-norm (one RMSNorm weight shared by all heads).

The layout is Llama's plus `self_attn.{q,k}_norm.weight` of shape (head_dim,), applied per head before RoPE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from plamo_jax.convert import config_json, llama
from plamo_jax.errors import ConversionError

ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPE = "qwen3"
DEFAULT_ROPE_THETA = 10000.0  # Qwen3Config's default in transformers 5


def hf_config(model_cfg) -> dict:
    if not model_cfg.qk_norm:
        raise ConversionError(f"{ARCHITECTURE} holds dense models with QK-norm; got model.qk_norm=False "
                              "(export as LlamaForCausalLM instead)")
    return {
        **llama.base_hf_config(model_cfg, ARCHITECTURE, MODEL_TYPE),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": model_cfg.num_layers,
        "layer_types": ["full_attention"] * model_cfg.num_layers,
    }


def model_overrides(hf_cfg: dict) -> dict:
    where = f"{ARCHITECTURE} config"
    own_fields = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
    config_json.check_config_keys(hf_cfg, (*llama.BASE_FIELDS, *own_fields), where)
    config_json.require_value(hf_cfg, "use_sliding_window", [False], where)
    layer_types = hf_cfg.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ConversionError(f"{where}: config field layer_types={layer_types!r} cannot be mapped; "
                                 "expected only 'full_attention'")
    return {**llama.base_model_overrides(hf_cfg, where, DEFAULT_ROPE_THETA), "qk_norm": True}


def export_tensors(params, model_cfg) -> Iterator[tuple[str, np.ndarray]]:
    yield from llama.export_embeddings(params, model_cfg)
    yield from llama.export_layers(params, model_cfg, llama.dense_layer_mappings(qk_norm=True))


def import_params(read: Callable[[str], np.ndarray], model_cfg) -> Iterator[tuple[str, np.ndarray]]:
    yield from llama.import_embeddings(read, model_cfg)
    yield from llama.import_layers(read, model_cfg, llama.dense_layer_mappings(qk_norm=True))
