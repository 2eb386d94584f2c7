"""Reading and writing Hugging Face config.json for the format modules (llama, qwen3, plamo2, ...).

A format module turns our model config into config.json and back; these helpers name every field a
module does not understand, so a conversion never silently changes the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from plamo_jax.errors import ConversionError

# Keys every transformers config may carry that say nothing about the weights' meaning.
GENERIC_CONFIG_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "max_position_embeddings", "initializer_range", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "tie_word_embeddings", "attention_dropout", "pretraining_tp", "_attn_implementation_autoset",
    "auto_map", "quantization_config_applied", "tokenizer_class", "finetuning_task", "prefix",
    "task_specific_params", "add_cross_attention", "tf_legacy_loss", "use_bfloat16",
    "_from_model_config",
})


def check_config_keys(hf_config: Mapping, handled: Iterable[str], where: str) -> None:
    """Raise naming every config key that is neither generic nor handled by the format module."""
    unknown = sorted(set(hf_config) - GENERIC_CONFIG_KEYS - set(handled))
    if unknown:
        raise ConversionError(
            f"{where}: config fields {unknown} are not understood by this converter; converting would "
            "silently change the model, so nothing was written"
        )


def require_value(hf_config: Mapping, key: str, allowed: Iterable[Any], where: str) -> None:
    """Raise when a key is present with a value our model cannot represent."""
    allowed = list(allowed)
    if key in hf_config and hf_config[key] not in allowed:
        raise ConversionError(f"{where}: config field {key}={hf_config[key]!r} cannot be mapped; "
                              f"expected one of {allowed}")


def rope_theta_of(hf_config: Mapping, default: float, where: str) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or a top-level `rope_theta`; plain RoPE only."""
    parameters = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling")
    if scaling:
        raise ConversionError(f"{where}: config field rope_scaling={scaling!r} cannot be mapped; "
                              "expected null (plain RoPE)")
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ConversionError(f"{where}: config field rope_parameters.rope_type={rope_type!r} cannot be "
                              "mapped; expected 'default' (plain RoPE)")
    extra = sorted(set(parameters) - {"rope_theta", "rope_type"})
    if extra:
        raise ConversionError(f"{where}: config fields rope_parameters.{extra} cannot be mapped")
    nested, top = parameters.get("rope_theta"), hf_config.get("rope_theta")
    if nested is not None and top is not None and float(nested) != float(top):
        raise ConversionError(f"{where}: rope_parameters.rope_theta={nested} and rope_theta={top} disagree")
    value = nested if nested is not None else top
    return float(default if value is None else value)


def rope_config(theta: float) -> dict:
    """Both RoPE forms: `rope_parameters` for transformers 5, top-level `rope_theta` for other readers."""
    theta = float(theta)
    return {"rope_theta": theta, "rope_parameters": {"rope_theta": theta, "rope_type": "default"}}


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} is missing: a Hugging Face model directory needs config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not a JSON file ({error})") from None


def architecture_of(hf_config: Mapping, where: str) -> str:
    architectures = hf_config.get("architectures") or []
    if len(architectures) != 1:
        raise ConversionError(f"{where}: config field architectures={architectures!r}; expected one entry")
    return architectures[0]
