"""Llama (`LlamaForCausalLM`) <-> our dense decoder; the dense-layer mappings here are shared by qwen3.py.

Layouts: HF linear weights are [out, in]. Ours: q/k/v [L, d_model, heads, head_dim], o [L, heads,
head_dim, d_model], gate/up [L, d_model, mlp], down [L, mlp, d_model], lm_head [d_model, vocab].
Both sides use rotate-half RoPE with heads laid out as consecutive head_dim blocks, so no permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from plamo_jax.convert import config_json
from plamo_jax.errors import ConversionError

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_MAX_POSITIONS = 4096

LAYER = "model.layers.{}."
# (our path, HF name inside a layer, to_hf(ours_one_layer, cfg), from_hf(hf_tensor, cfg))
Mapping_ = tuple[str, str, Callable, Callable]


def _to_hf_in_heads(w_DHK, cfg):  # q/k/v: [d_model, heads, head_dim] -> [heads * head_dim, d_model]
    return w_DHK.reshape(w_DHK.shape[0], -1).T


def _from_hf_in_heads(w, cfg):
    return w.T.reshape(cfg.d_model, -1, cfg.head_dim)


def _to_hf_out_heads(w_HKD, cfg):  # o: [heads, head_dim, d_model] -> [d_model, heads * head_dim]
    return w_HKD.reshape(-1, w_HKD.shape[-1]).T


def _from_hf_out_heads(w, cfg):
    return w.T.reshape(-1, cfg.head_dim, cfg.d_model)


def _transpose(w, cfg):
    return w.T


def _same(w, cfg):
    return w


def attention_mappings(qk_norm: bool) -> list[Mapping_]:
    mappings = [
        ("blocks/attn/q_proj", "self_attn.q_proj.weight", _to_hf_in_heads, _from_hf_in_heads),
        ("blocks/attn/k_proj", "self_attn.k_proj.weight", _to_hf_in_heads, _from_hf_in_heads),
        ("blocks/attn/v_proj", "self_attn.v_proj.weight", _to_hf_in_heads, _from_hf_in_heads),
        ("blocks/attn/o_proj", "self_attn.o_proj.weight", _to_hf_out_heads, _from_hf_out_heads),
    ]
    if qk_norm:
        mappings += [
            ("blocks/attn/q_norm/scale", "self_attn.q_norm.weight", _same, _same),
            ("blocks/attn/k_norm/scale", "self_attn.k_norm.weight", _same, _same),
        ]
    return mappings


def dense_layer_mappings(qk_norm: bool) -> list[Mapping_]:
    return [
        ("blocks/attn_norm/scale", "input_layernorm.weight", _same, _same),
        *attention_mappings(qk_norm),
        ("blocks/mlp_norm/scale", "post_attention_layernorm.weight", _same, _same),
        ("blocks/mlp/gate", "mlp.gate_proj.weight", _transpose, _transpose),
        ("blocks/mlp/up", "mlp.up_proj.weight", _transpose, _transpose),
        ("blocks/mlp/down", "mlp.down_proj.weight", _transpose, _transpose),
    ]


def _get(params: Mapping, path: str):
    for key in path.split("/"):
        params = params[key]
    return params


def export_layers(params: Mapping, model_cfg, mappings: list[Mapping_]) -> Iterator[tuple[str, np.ndarray]]:
    """Parameter-major: every layer of one stacked parameter before the next parameter is read."""
    for path, hf_name, to_hf, _ in mappings:
        stacked = _get(params, path)
        for layer in range(model_cfg.num_layers):
            yield LAYER.format(layer) + hf_name, to_hf(np.asarray(stacked[layer]), model_cfg)


def import_layers(read: Callable[[str], np.ndarray], model_cfg,
                  mappings: list[Mapping_]) -> Iterator[tuple[str, np.ndarray]]:
    """Stack each parameter over layers into one preallocated array (no per-layer list kept)."""
    for path, hf_name, _, from_hf in mappings:
        stacked = None
        for layer in range(model_cfg.num_layers):
            value = from_hf(read(LAYER.format(layer) + hf_name), model_cfg)
            if stacked is None:
                stacked = np.empty((model_cfg.num_layers, *value.shape), np.float32)
            elif value.shape != stacked.shape[1:]:
                raise ConversionError(f"tensor {LAYER.format(layer) + hf_name} has shape {value.shape} "
                                         f"after conversion; layer 0 had {stacked.shape[1:]}")
            stacked[layer] = value
        yield path, stacked


def export_embeddings(params: Mapping, model_cfg) -> Iterator[tuple[str, np.ndarray]]:
    yield "model.embed_tokens.weight", np.asarray(params["embed"])
    yield "model.norm.weight", np.asarray(_get(params, "final_norm/scale"))
    if not model_cfg.tie_embeddings:
        yield "lm_head.weight", np.asarray(params["lm_head"]).T


def import_embeddings(read: Callable[[str], np.ndarray], model_cfg) -> Iterator[tuple[str, np.ndarray]]:
    embed = read("model.embed_tokens.weight")
    yield "embed", embed
    yield "final_norm/scale", read("model.norm.weight")
    if not model_cfg.tie_embeddings:
        yield "lm_head", read("lm_head.weight").T
        return
    try:  # some tied checkpoints still store the head; accept it only as an exact copy
        head = read("lm_head.weight")
    except ConversionError:
        return
    if not np.array_equal(head, embed):
        raise ConversionError("config field tie_word_embeddings=true, but lm_head.weight differs from "
                                 "model.embed_tokens.weight; expected identical tensors or no lm_head.weight")


def base_hf_config(model_cfg, architecture: str, model_type: str) -> dict:
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.mlp_dim,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads,
        "num_key_value_heads": model_cfg.num_kv_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": model_cfg.norm_eps,
        "tie_word_embeddings": bool(model_cfg.tie_embeddings),
        "initializer_range": model_cfg.init_std,
        "max_position_embeddings": DEFAULT_MAX_POSITIONS,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        **config_json.rope_config(model_cfg.rope_theta),
    }


# Fields of base_hf_config that model_overrides reads (the rest: config_json.GENERIC_CONFIG_KEYS).
BASE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
               "rope_parameters", "rope_scaling", "attention_bias")


def base_model_overrides(hf_cfg: Mapping, where: str, default_rope_theta: float) -> dict:
    config_json.require_value(hf_cfg, "hidden_act", ["silu", "swish"], where)
    config_json.require_value(hf_cfg, "attention_bias", [False], where)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf_cfg:
            raise ConversionError(f"{where}: config field {key} is missing")
    num_heads = hf_cfg["num_attention_heads"]
    head_dim = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // num_heads
    overrides = {
        "family": "dense",
        "vocab_size": int(hf_cfg["vocab_size"]),
        "d_model": int(hf_cfg["hidden_size"]),
        "mlp_dim": int(hf_cfg["intermediate_size"]),
        "num_layers": int(hf_cfg["num_hidden_layers"]),
        "num_heads": int(num_heads),
        "num_kv_heads": int(hf_cfg.get("num_key_value_heads") or num_heads),
        "head_dim": int(head_dim),
        "norm_eps": float(hf_cfg.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf_cfg.get("tie_word_embeddings", False)),
        "rope_theta": config_json.rope_theta_of(hf_cfg, default_rope_theta, where),
    }
    if "initializer_range" in hf_cfg:
        overrides["init_std"] = float(hf_cfg["initializer_range"])
    return overrides


# -- the format protocol ---------------------------------------------------------------------------

def hf_config(model_cfg) -> dict:
    if model_cfg.qk_norm:
        raise ConversionError(f"{ARCHITECTURE} holds dense models without QK-norm; got model.qk_norm=True "
                              "(export as Qwen3ForCausalLM instead)")
    return {**base_hf_config(model_cfg, ARCHITECTURE, MODEL_TYPE), "mlp_bias": False, "pretraining_tp": 1}


def model_overrides(hf_cfg: dict) -> dict:
    where = f"{ARCHITECTURE} config"
    config_json.check_config_keys(hf_cfg, (*BASE_FIELDS, "mlp_bias"), where)
    config_json.require_value(hf_cfg, "mlp_bias", [False], where)
    return {**base_model_overrides(hf_cfg, where, DEFAULT_ROPE_THETA), "qk_norm": False}


def export_tensors(params, model_cfg) -> Iterator[tuple[str, np.ndarray]]:
    yield from export_embeddings(params, model_cfg)
    yield from export_layers(params, model_cfg, dense_layer_mappings(qk_norm=False))


def import_params(read: Callable[[str], np.ndarray], model_cfg) -> Iterator[tuple[str, np.ndarray]]:
    yield from import_embeddings(read, model_cfg)
    yield from import_layers(read, model_cfg, dense_layer_mappings(qk_norm=False))
