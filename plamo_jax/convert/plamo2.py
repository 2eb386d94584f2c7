"""PLaMo 2 Hugging Face format (`Plamo2ForCausalLM`, model_type "plamo2") <-> our hybrid family.

Checkpoint names carry a doubled "layers" (`model.layers.layers.{i}.`) and torch [out, in] layouts.
Mapping of our stacked parameters (leading axis = scanned group g; layer i = g * mamba_step + j):
  norms                <- RMSNorm scale (both store the delta from the norm's offset)
  mlp.gate_up_proj     <- concat(gate, up) transposed; mlp.down_proj <- down transposed
  mixer.in_proj        <- in_proj [D, H, 2, P]: per head [z_h, x_h], as PLaMo 2 interleaves them
  mixer.conv1d         <- conv [K, H, P] as [H*P, 1, K]
  mixer.bcdt_proj      <- bcdt_proj [H, P, 2N + R] with outputs [B | C | dt]
  mixer.qkv_proj       <- q | k | v with heads contiguous; KV head of query head h is h // (H / KV)
Our attention and Mamba layers share PLaMo 2's `hidden_size_per_head`, so head_dim == ssm_head_dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np

from plamo_jax.errors import ConversionError
from plamo_jax.models.hybrid import is_mamba_layer, layer_name

ARCHITECTURE = "Plamo2ForCausalLM"
MODEL_TYPE = "plamo2"
MAX_POSITIONS = 10485760  # what PLaMo 2 writes; positions are RoPE, so this bounds nothing we compute
PREFIX = "model.layers.layers"
MAMBA_SCALARS = ("dt_bias", "A_log", "D")
MAMBA_NORMS = {"dt_norm_weight": "dt_norm", "B_norm_weight": "B_norm", "C_norm_weight": "C_norm"}
LAYER_NORMS = ("pre_mixer_norm", "post_mixer_norm", "pre_mlp_norm", "post_mlp_norm")

# config.json keys that describe nothing we compute (tokens, runtime, quantised-training flags) and the
# values PLaMo 2 checkpoints carry for unused features; other values of these keys cannot be mapped.
_IGNORED_KEYS = {"architectures", "auto_map", "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
                 "torch_dtype", "dtype", "transformers_version", "use_cache", "tokenizer_class",
                 "linear_type",
                 "fp8_accum_dtype", "eval_attention_n_bit", "eval_mlp_n_bit", "max_position_embeddings",
                 "image_feature_size", "image_proj_type", "image_token_id", "group_size", "capacity_factor",
                 "expert_dropout"}
_UNUSED_FEATURE_VALUES = {"mamba_enabled": (True,), "n_expert": (None,), "k_expert": (None,),
                          "shared_intermediate_size": (None,), "sparse_intermediate_size": (None,),
                          "sparse_step": (None,), "use_predefined_initial_state": (False,)}


def _check_compatible(cfg: ml_collections.ConfigDict) -> None:
    if cfg.head_dim != cfg.ssm_head_dim:
        raise ConversionError(f"config keys model.head_dim={cfg.head_dim} and "
                         f"model.ssm_head_dim={cfg.ssm_head_dim}"
                         " must be equal: PLaMo 2 has one hidden_size_per_head for attention and Mamba")


def _attention_layers(cfg) -> list[int]:
    return [i for i in range(cfg.num_layers) if not is_mamba_layer(cfg, i)]


def hf_config(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.json contents for a hybrid model config."""
    cfg = model_cfg
    _check_compatible(cfg)
    if cfg.attention_window > 0:
        window, full_layers = cfg.attention_window, sorted(int(i) for i in cfg.full_attention_layers)
    else:  # PLaMo 2 has no "no window" value: every attention layer is listed as full
        window, full_layers = MAX_POSITIONS, _attention_layers(cfg)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_size_per_head": cfg.head_dim,
        "intermediate_size": cfg.mlp_dim,
        "mamba_d_state": cfg.ssm_state_dim,
        "mamba_d_conv": cfg.ssm_conv_width,
        "mamba_num_heads": cfg.ssm_num_heads,
        "mamba_step": cfg.mamba_step,
        "mamba_chunk_size": cfg.ssm_chunk_size,
        "mamba_enabled": True,
        "attention_window_size": window,
        "sliding_window": window,
        "full_attention_idx": full_layers,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def model_overrides(hf_config: dict[str, Any]) -> dict[str, Any]:
    """Our model-config fields from a PLaMo 2 config.json; ConversionError names any field we cannot map."""
    known = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "hidden_size_per_head", "intermediate_size", "mamba_d_state", "mamba_d_conv", "mamba_num_heads",
             "mamba_step", "mamba_chunk_size", "attention_window_size", "sliding_window",
             "full_attention_idx",
             "rms_norm_eps", "rope_theta", "vocab_size", "tie_word_embeddings"}
    problems = []
    for key, value in hf_config.items():
        if key in _UNUSED_FEATURE_VALUES and value not in _UNUSED_FEATURE_VALUES[key]:
            problems.append(f"{key}={value!r} (supported: {_UNUSED_FEATURE_VALUES[key]})")
        elif key not in known and key not in _IGNORED_KEYS and key not in _UNUSED_FEATURE_VALUES:
            problems.append(f"{key}={value!r} (unknown field)")
    if hf_config.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        problems.append(f"model_type={hf_config['model_type']!r} (expected {MODEL_TYPE!r})")
    window = hf_config.get("attention_window_size", 2048)
    sliding = hf_config.get("sliding_window", window)
    if sliding is not None and sliding != window:
        problems.append(f"sliding_window={sliding!r} (differs from attention_window_size={window!r})")
    missing = sorted({"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "hidden_size_per_head", "intermediate_size", "mamba_num_heads", "vocab_size"}
                     - hf_config.keys())
    if missing:
        problems.append(f"missing {missing}")
    if problems:
        raise ConversionError("PLaMo 2 config.json fields that cannot be mapped: " + "; ".join(problems))
    step = hf_config.get("mamba_step", 2)
    num_layers = hf_config["num_hidden_layers"]
    attention_layers = [i for i in range(num_layers) if i % step == step // 2]
    full_layers = tuple(int(i) for i in hf_config.get("full_attention_idx") or ())
    if attention_layers and sorted(full_layers) == attention_layers:
        window, full_layers = 0, ()
    return {
        "family": "hybrid",
        "vocab_size": hf_config["vocab_size"],
        "d_model": hf_config["hidden_size"],
        "num_layers": num_layers,
        "num_heads": hf_config["num_attention_heads"],
        "num_kv_heads": hf_config["num_key_value_heads"],
        "head_dim": hf_config["hidden_size_per_head"],
        "mlp_dim": hf_config["intermediate_size"],
        "qk_norm": True,
        "tie_embeddings": bool(hf_config.get("tie_word_embeddings", True)),
        "rope_theta": float(hf_config.get("rope_theta", 10000.0)),
        "norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
        "mamba_step": step,
        "ssm_num_heads": hf_config["mamba_num_heads"],
        "ssm_head_dim": hf_config["hidden_size_per_head"],
        "ssm_state_dim": hf_config.get("mamba_d_state", 64),
        "ssm_conv_width": hf_config.get("mamba_d_conv", 4),
        "ssm_chunk_size": hf_config.get("mamba_chunk_size", 256),
        "attention_window": window,
        "full_attention_layers": full_layers,
    }


# --- per-layer tensor conversions (one layer's slice of our stacked parameters) ---------------------------

def _mamba_to_hf(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    d_model, heads, _, head_dim = p["in_proj"].shape
    inner = heads * head_dim
    out = {
        "in_proj.weight": p["in_proj"].reshape(d_model, 2 * inner).T,
        "conv1d.weight": p["conv"].reshape(-1, inner).T[:, None, :],
        "bcdt_proj.weight": p["bcdt_proj"].reshape(inner, -1).T,
        "dt_proj.weight": p["dt_proj"].T,
        "out_proj.weight": p["out_proj"].reshape(inner, -1).T,
    }
    out.update({name: p[name] for name in MAMBA_SCALARS})
    out.update({hf: p[ours]["scale"] for hf, ours in MAMBA_NORMS.items()})
    return out


def _mamba_from_hf(t: dict[str, np.ndarray], cfg) -> dict[str, Any]:
    heads, head_dim, d_model = cfg.ssm_num_heads, cfg.ssm_head_dim, cfg.d_model
    out = {
        "in_proj": t["in_proj.weight"].T.reshape(d_model, heads, 2, head_dim),
        "conv": t["conv1d.weight"].reshape(heads * head_dim, -1).T.reshape(-1, heads, head_dim),
        "bcdt_proj": t["bcdt_proj.weight"].T.reshape(heads, head_dim, -1),
        "dt_proj": t["dt_proj.weight"].T,
        "out_proj": t["out_proj.weight"].T.reshape(heads, head_dim, d_model),
    }
    out.update({name: t[name] for name in MAMBA_SCALARS})
    out.update({ours: {"scale": t[hf]} for hf, ours in MAMBA_NORMS.items()})
    return out


def _attention_to_hf(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    d_model = p["q_proj"].shape[0]
    q, k, v = (p[n].reshape(d_model, -1).T for n in ("q_proj", "k_proj", "v_proj"))
    return {
        "qkv_proj.weight": np.concatenate([q, k, v], axis=0),
        "o_proj.weight": p["o_proj"].reshape(-1, d_model).T,
        "q_weight": p["q_norm"]["scale"],
        "k_weight": p["k_norm"]["scale"],
    }


def _attention_from_hf(t: dict[str, np.ndarray], cfg) -> dict[str, Any]:
    d_model, head_dim = cfg.d_model, cfg.head_dim
    q_size, kv_size = cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim
    qkv = t["qkv_proj.weight"]
    if qkv.shape != (q_size + 2 * kv_size, d_model):
        raise ConversionError(f"qkv_proj.weight has shape {qkv.shape}; "
                              f"expected {(q_size + 2 * kv_size, d_model)}")
    q, k, v = np.split(qkv, [q_size, q_size + kv_size], axis=0)
    return {
        "q_proj": q.T.reshape(d_model, cfg.num_heads, head_dim),
        "k_proj": k.T.reshape(d_model, cfg.num_kv_heads, head_dim),
        "v_proj": v.T.reshape(d_model, cfg.num_kv_heads, head_dim),
        "o_proj": t["o_proj.weight"].T.reshape(cfg.num_heads, head_dim, d_model),
        "q_norm": {"scale": t["q_weight"]},
        "k_norm": {"scale": t["k_weight"]},
    }


def _mixer_names(cfg, layer_index: int) -> list[str]:
    if is_mamba_layer(cfg, layer_index):
        return ["in_proj.weight", "conv1d.weight", "bcdt_proj.weight", "dt_proj.weight", "out_proj.weight",
                *MAMBA_SCALARS, *MAMBA_NORMS]
    return ["qkv_proj.weight", "o_proj.weight", "q_weight", "k_weight"]


def _index(tree, g: int):
    """Layer g of a stacked subtree (a dict, or the converter's lazily-read checkpoint Mapping)."""
    if isinstance(tree, Mapping):
        return {k: _index(v, g) for k, v in tree.items()}
    return np.asarray(tree[g], dtype=np.float32)


def export_tensors(params: dict, model_cfg: ml_collections.ConfigDict) -> Iterator[tuple[str, np.ndarray]]:
    """(name, C-contiguous fp32 array) for every tensor of a PLaMo 2 checkpoint, one layer at a time.

    C order matters: safetensors' numpy writer stores a transposed view's buffer as if it were C order.
    """
    for name, value in _export_views(params, model_cfg):
        yield name, np.ascontiguousarray(value, dtype=np.float32)


def _export_views(params: dict, cfg: ml_collections.ConfigDict) -> Iterator[tuple[str, np.ndarray]]:
    _check_compatible(cfg)
    step = cfg.mamba_step
    yield "model.embed_tokens.weight", np.asarray(params["embed"])
    for g in range(cfg.num_layers // step):
        for j in range(step):
            layer = _index(params["blocks"][layer_name(j)], g)
            prefix = f"{PREFIX}.{g * step + j}"
            for norm in LAYER_NORMS:
                yield f"{prefix}.{norm}.weight", layer[norm]["scale"]
            yield f"{prefix}.mlp.gate_up_proj.weight", np.concatenate(
                [layer["mlp"]["gate"].T, layer["mlp"]["up"].T], axis=0)
            yield f"{prefix}.mlp.down_proj.weight", layer["mlp"]["down"].T
            mixer = _mamba_to_hf(layer["mixer"]) if is_mamba_layer(cfg, g * step + j) else \
                _attention_to_hf(layer["mixer"])
            for name, value in mixer.items():
                yield f"{prefix}.mixer.{name}", value
    yield "model.norm.weight", np.asarray(params["final_norm"]["scale"])
    if not cfg.tie_embeddings:
        yield "lm_head.weight", np.asarray(params["lm_head"]).T


def _flatten(tree: dict, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}/{key}")
        else:
            yield f"{prefix}/{key}", value


def import_params(read: Callable[[str], np.ndarray],
                  model_cfg: ml_collections.ConfigDict) -> Iterator[tuple[str, np.ndarray]]:
    """(our '/'-joined parameter path, stacked fp32 value) for every parameter, from PLaMo 2 tensors."""
    cfg = model_cfg
    _check_compatible(cfg)
    step = cfg.mamba_step
    num_groups = cfg.num_layers // step

    def load(name: str) -> np.ndarray:
        return np.asarray(read(name), dtype=np.float32)

    yield "embed", load("model.embed_tokens.weight")
    for j in range(step):
        per_group = []
        for g in range(num_groups):
            prefix = f"{PREFIX}.{g * step + j}"
            layer: dict[str, Any] = {norm: {"scale": load(f"{prefix}.{norm}.weight")} for norm in LAYER_NORMS}
            gate, up = np.split(load(f"{prefix}.mlp.gate_up_proj.weight"), 2, axis=0)
            layer["mlp"] = {"gate": gate.T, "up": up.T, "down": load(f"{prefix}.mlp.down_proj.weight").T}
            tensors = {n: load(f"{prefix}.mixer.{n}") for n in _mixer_names(cfg, g * step + j)}
            layer["mixer"] = (_mamba_from_hf(tensors, cfg) if is_mamba_layer(cfg, g * step + j)
                              else _attention_from_hf(tensors, cfg))
            per_group.append(dict(_flatten(layer, f"blocks/{layer_name(j)}")))
        for path in per_group[0]:
            yield path, np.stack([group[path] for group in per_group])
    yield "final_norm/scale", load("model.norm.weight")
    if not cfg.tie_embeddings:
        yield "lm_head", load("lm_head.weight").T
