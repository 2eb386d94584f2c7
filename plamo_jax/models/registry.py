"""The model families, by the name `model.family` gives, and what the rest of the stack asks of them.

    registry.get_family(cfg)          # the FamilySpec of a model config (ConfigError when unknown)
    registry.register_family(spec)    # a family defined outside this package (a plugin, a test)
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from plamo_jax.errors import ConfigError
from plamo_jax.models.dense import DENSE
from plamo_jax.models.family import CHANGEABLE_KEYS, FamilySpec, MeshSizes, require, require_divisible
from plamo_jax.models.hybrid import HYBRID
from plamo_jax.models.moe import MOE

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (DENSE, HYBRID, MOE)}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add a family; its name becomes a valid `model.family`. Registering a name twice is refused."""
    if spec.name in FAMILIES and FAMILIES[spec.name] is not spec:
        raise ConfigError(f"model family {spec.name!r} is already registered")
    FAMILIES[spec.name] = spec
    return spec


def get_family(cfg_or_name: ml_collections.ConfigDict | str) -> FamilySpec:
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.family
    if name not in FAMILIES:
        raise ConfigError(f"config key model.family={name!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def validate_model(cfg: ml_collections.ConfigDict, sizes: MeshSizes) -> None:
    """The keys every decoder uses, then the family's own; ConfigError names the first bad key."""
    family = get_family(cfg)
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        require(cfg[key] > 0, key, cfg[key], "a positive integer")
    require(cfg.scan_unroll >= 1, "scan_unroll", cfg.scan_unroll, "an integer >= 1")
    require(cfg.num_heads % cfg.num_kv_heads == 0, "num_heads", cfg.num_heads,
            f"a multiple of model.num_kv_heads={cfg.num_kv_heads}")
    require(cfg.head_dim % 2 == 0, "head_dim", cfg.head_dim, "an even number (rotary embeddings)")
    for key in ("num_heads", "num_kv_heads", "vocab_size"):
        require_divisible(cfg, key, sizes["tensor"], "the tensor-parallel mesh size mesh.tensor")
    require_divisible(cfg, "d_model", sizes["fsdp"], "the FSDP mesh size")
    family.num_blocks(cfg)
    family.validate(cfg, sizes)


def architecture_differences(saved: Mapping, ours: ml_collections.ConfigDict) -> list[str]:
    """`model.key=ours (checkpoint: saved)` for every architecture key of our family that differs.

    Only keys the family uses are compared (an MoE's unused mlp_dim is not); a different family is
    reported alone, as its other keys mean different things.
    """
    family = get_family(ours)
    if saved.get("family", ours.family) != ours.family:
        return [f"model.family={ours.family!r} (checkpoint: {saved['family']!r})"]
    return [f"model.{key}={ours[key]!r} (checkpoint: {saved[key]!r})"
            for key in family.all_architecture_keys() if key in saved and _differ(saved[key], ours[key])]


def changed_keys(saved: Mapping, ours: ml_collections.ConfigDict) -> list[str]:
    """Keys a continued run may change on purpose (a longer context, full attention) that it did change."""
    return [key for key in CHANGEABLE_KEYS if key in saved and _differ(saved[key], ours[key])]


def _differ(saved, ours) -> bool:
    as_tuple = lambda v: tuple(v) if isinstance(v, list | tuple) else v  # JSON turns tuples into lists
    return as_tuple(saved) != as_tuple(ours)
