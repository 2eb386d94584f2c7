"""The family spec: everything that differs between model families, in one object per family.

Each family module (`dense`, `moe`, `hybrid`) defines its `FamilySpec`; `registry` lists them. The
trainer, the objectives, the FLOPs count, the memory estimator, the checkpoint checks and the Hugging
Face converter ask the spec, never the family's name, so a new family is one model module, one
registry entry (`registry.register_family`), one HF mapping and one recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from flax import nnx

from plamo_jax.errors import ConfigError

ModelConfig = ml_collections.ConfigDict
MeshSizes = Mapping[str, int]  # mesh axis -> devices along it (ICI x DCN)
ShardCount = Callable[[str], int]  # logical axis name -> how many shards split a dimension with it
BlockParts = Callable[[nnx.Module], list[tuple[nnx.Module, Callable[..., Any]]]]

# Keys every decoder has: they decide which parameters exist and must match a checkpoint to continue it.
SHARED_ARCHITECTURE_KEYS = ("family", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                            "head_dim", "tie_embeddings")
# Keys a continued run may change on purpose (context extension, PLaMo 2's switch to full attention).
CHANGEABLE_KEYS = ("rope_theta", "norm_eps", "attention_window", "full_attention_layers")
# Activation widths split by tensor parallelism: model key -> the logical axis of that activation.
SHARED_ACTIVATION_SHARDS = {"num_heads": "act_heads", "num_kv_heads": "act_kv_heads"}


def _one(cfg: ModelConfig) -> int:
    return 1


def _no_auxiliary_losses(cfg: ModelConfig) -> dict[str, float]:
    return {}


def _no_parts(block: nnx.Module) -> list:
    return []


def _no_dispatch(cfg: ModelConfig, shards: ShardCount, tokens_per_device: int) -> float:
    return 0.0


@dataclasses.dataclass(frozen=True)
class MemoryPart:
    """A family's own share of a block's activations, shown (not added) in the memory breakdown."""

    label: str  # e.g. "SSM state, conv and chunk buffers"
    what: str  # e.g. "Mamba mixers"
    select: BlockParts  # block -> [(module, call(module, x_BLD, segment_ids_BL) -> output)]


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """One model family.

    block: the scanned unit, `block(cfg, rngs=...)`, called as
        `block(x_BLD, segment_ids_BL, positions_BL, block_index) -> (x_BLD, aux)`;
        aux maps names to per-block values (losses, statistics) that the decoder stacks over blocks.
    validate: raises ConfigError naming the key for the family's own keys (mesh sizes given).
    architecture_keys: the family's keys (beyond SHARED_ARCHITECTURE_KEYS) that a checkpoint must match.
    forward_flops_per_token: (cfg, seq_len) -> model FLOPs of one token's forward pass.
    layers_per_block: model layers in one scanned block (num_layers must be a multiple).
    attention_layers_per_block: attention layers in one block (the estimator counts their gathered K/V).
    auxiliary_losses: cfg -> {aux name: coefficient}; the objective adds coefficient x sum over blocks.
    activation_shards: model keys whose activations tensor parallelism splits -> logical axis.
    memory_part: the family's own activations, broken out in the estimate.
    dispatch_bytes: (cfg, shard count, tokens per device) -> communication buffers of one block.
    hf_formats: the Hugging Face formats (names in convert/formats.py) that hold this family.
    default_hf_format: cfg -> the format exported when none is named.
    final_norm_offset: the final RMSNorm stores scale - offset (PLaMo 2 stores deltas from 1).
    megatron_formula: whether Fujii et al.'s dense formula applies as a second opinion on memory.
    rows_independent: whether a block treats batch rows independently (MoE routes, balances and caps
        over the whole token set: no); the pipeline then keeps one weight copy per data shard
        (models/pipelined_stack.py `data_copies`).
    cached_decoding: whether blocks decode with a KV cache: `block.init_cache(batch, max_length)` and
        `block.extend(x_BTD, positions_BT, start, cache, key_valid_BS, block_index) -> (x_BTD, cache)`
        (`decoder.Decoder.init_cache` / `extend`); generation re-runs the whole buffer per token otherwise.
    """

    name: str
    block: type[nnx.Module]
    validate: Callable[[ModelConfig, MeshSizes], None]
    architecture_keys: tuple[str, ...]
    forward_flops_per_token: Callable[[ModelConfig, int], float]
    layers_per_block: Callable[[ModelConfig], int] = _one
    attention_layers_per_block: Callable[[ModelConfig], int] = _one
    auxiliary_losses: Callable[[ModelConfig], Mapping[str, float]] = _no_auxiliary_losses
    activation_shards: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(SHARED_ACTIVATION_SHARDS))
    memory_part: MemoryPart | None = None
    dispatch_bytes: Callable[[ModelConfig, ShardCount, int], float] = _no_dispatch
    hf_formats: tuple[str, ...] = ()
    default_hf_format: Callable[[ModelConfig], str] | None = None
    final_norm_offset: float = 0.0
    megatron_formula: bool = False
    rows_independent: bool = True
    cached_decoding: bool = False

    def num_blocks(self, cfg: ModelConfig) -> int:
        per_block = self.layers_per_block(cfg)
        if per_block < 1 or cfg.num_layers % per_block:
            raise ConfigError(
                f"config key model.num_layers={cfg.num_layers}: expected a multiple of the {per_block} "
                f"layers that one scanned block of family {self.name!r} holds"
            )
        return cfg.num_layers // per_block

    def all_architecture_keys(self) -> tuple[str, ...]:
        return SHARED_ARCHITECTURE_KEYS + tuple(k for k in self.architecture_keys
                                                if k not in SHARED_ARCHITECTURE_KEYS)


def require(condition: bool, key: str, value: Any, expected: str) -> None:
    """Raise ConfigError `config key model.<key>=<value>: expected <expected>` unless condition holds."""
    if not condition:
        raise ConfigError(f"config key model.{key}={value!r}: expected {expected}")


def require_positive(cfg: ModelConfig, *keys: str) -> None:
    for key in keys:
        require(cfg[key] > 0, key, cfg[key], "a positive integer")


def require_divisible(cfg: ModelConfig, key: str, divisor: int, what: str) -> None:
    require(cfg[key] % divisor == 0, key, cfg[key], f"divisible by {what}={divisor}")
