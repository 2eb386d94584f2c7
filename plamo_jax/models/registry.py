"""Model families: which block the decoder stacks, and how many of them.

Blocks are imported lazily so a family's module is only loaded when that family is used.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import ml_collections


@dataclasses.dataclass(frozen=True)
class Family:
    block_path: str  # "module:Class"; Class(cfg, rngs=...) with __call__(x, segment_ids, positions, index)
    layers_per_block: Callable[[ml_collections.ConfigDict], int]
    final_norm_offset: float = 0.0

    def block_class(self):
        module_name, class_name = self.block_path.split(":")
        return getattr(importlib.import_module(module_name), class_name)

    def num_blocks(self, cfg: ml_collections.ConfigDict) -> int:
        per_block = self.layers_per_block(cfg)
        if cfg.num_layers % per_block:
            raise ValueError(
                f"config key model.num_layers={cfg.num_layers} must be a multiple of the {per_block} "
                f"layers that one scanned block of family {cfg.family!r} holds"
            )
        return cfg.num_layers // per_block


FAMILIES: dict[str, Family] = {
    "dense": Family("plamo_jax.models.decoder:DenseBlock", lambda cfg: 1),
    "moe": Family("plamo_jax.models.moe:MoEBlock", lambda cfg: 1),
    # PLaMo 2: one scanned block is a group of `mamba_step` layers; the final norm stores a delta from 1.
    "hybrid": Family(
        "plamo_jax.models.hybrid:HybridGroup", lambda cfg: cfg.mamba_step, final_norm_offset=1.0
    ),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"config key model.family={name!r} is unknown; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]
