"""The Hugging Face formats we read and write, and which family each holds.

Each format module (`llama`, `qwen3`, `plamo2`, `mixtral`, `qwen3_moe`) provides:

    ARCHITECTURE: str                                     # e.g. "LlamaForCausalLM"
    hf_config(model_cfg) -> dict                          # config.json contents
    model_overrides(hf_config: dict) -> dict              # our `model` fields; ConversionError on bad ones
    export_tensors(params, model_cfg) -> Iterator[(hf_name, np.ndarray)]
    import_params(read, model_cfg) -> Iterator[("blocks/attn/q_proj", stacked np.ndarray)]

Modules should export parameter-major (all layers of one stacked parameter, then the next) so that a
lazily read checkpoint holds one stacked parameter at a time. A family lists the formats that can
hold it (its spec's `hf_formats`); a new format is one module plus one entry here.
"""

from __future__ import annotations

from types import ModuleType

import ml_collections

from plamo_jax.convert import llama, mixtral, plamo2, qwen3, qwen3_moe
from plamo_jax.errors import ConversionError
from plamo_jax.models import registry

FORMATS: dict[str, ModuleType] = {
    "llama": llama,
    "qwen3": qwen3,
    "plamo2": plamo2,
    "mixtral": mixtral,
    "qwen3_moe": qwen3_moe,
}


def format_for_export(model_cfg: ml_collections.ConfigDict, name: str | None = None) -> ModuleType:
    """The format module to export `model_cfg` with: `name`, or the family's default."""
    family = registry.get_family(model_cfg)
    if name is None:
        if family.default_hf_format is None:
            raise ConversionError(f"config key model.family={family.name!r} has no Hugging Face format")
        name = family.default_hf_format(model_cfg)
    if name not in FORMATS:
        raise ConversionError(f"--format {name!r} is unknown; expected one of {sorted(FORMATS)}")
    if name not in family.hf_formats:
        raise ConversionError(f"--format {name!r} cannot hold model.family={family.name!r}; expected one of "
                              f"{list(family.hf_formats)}")
    return FORMATS[name]


def module_for_architecture(architecture: str, where: str = "config.json") -> ModuleType:
    for module in FORMATS.values():
        if module.ARCHITECTURE == architecture:
            return module
    known = sorted(module.ARCHITECTURE for module in FORMATS.values())
    raise ConversionError(f"{where}: architecture {architecture!r} is not supported; expected one of {known}")
