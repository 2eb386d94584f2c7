"""Shared building blocks: parameters with logical axes, RMSNorm, rotary embeddings, SwiGLU."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from plamo_jax.errors import ConfigError
from plamo_jax.models.projection import projection
from plamo_jax.parallel.rules import constrain

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """An fp32 parameter tagged with its logical axes (placed later by the trainer's rules)."""
    if len(shape) != len(logical_axes):
        raise ConfigError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    value = init(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(logical_axes), eager_sharding=False)


def compute_dtype(cfg: ml_collections.ConfigDict) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


def output_init_std(cfg: ml_collections.ConfigDict) -> float:
    """Residual-branch output projections start smaller with depth (GPT-2 / Megatron scaling)."""
    return cfg.init_std / (2 * cfg.num_layers) ** 0.5


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


def constant(value: float) -> Initializer:
    return jax.nn.initializers.constant(value)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, computed in fp32, returned in fp32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """RMSNorm with scale = offset + weight (offset 0 for Llama, 1 or 1/5 for PLaMo 2's deltas)."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float,
        rngs: nnx.Rngs,
        offset: float = 0.0,
        logical_axes: Sequence[str | None] = ("norm",),
    ):
        self.eps = eps
        self.offset = offset
        self.scale = param(rngs, constant(1.0 - offset), (dim,), logical_axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rms_normalize(x, self.eps) * (self.offset + self.scale[...])
        return y.astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [..., head_dim // 2] for integer positions."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BLHD: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotate-half (GPT-NeoX / Hugging Face Llama) rotary embedding, in fp32."""
    cos, sin = rope_angles(positions_BL, x_BLHD.shape[-1], theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x = x_BLHD.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BLHD.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(
        self,
        d_model: int,
        mlp_dim: int,
        *,
        init_std: float,
        out_init_std: float,
        dtype,
        rngs: nnx.Rngs,
        fp8: bool = False,
    ):
        self.dtype = dtype
        self.fp8 = fp8
        self.gate = param(rngs, normal(init_std), (d_model, mlp_dim), ("embed", "mlp"))
        self.up = param(rngs, normal(init_std), (d_model, mlp_dim), ("embed", "mlp"))
        self.down = param(rngs, normal(out_init_std), (mlp_dim, d_model), ("mlp", "embed"))

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, width: int, *, rngs: nnx.Rngs) -> SwiGLU:
        """A SwiGLU of hidden `width` with the model's dtype, initialisation and FP8 setting."""
        return cls(cfg.d_model, width, init_std=cfg.init_std, out_init_std=output_init_std(cfg),
                   dtype=compute_dtype(cfg), rngs=rngs, fp8=cfg.fp8)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        gate = projection("bld,df->blf", x_BLD, self.gate[...], self.dtype, self.fp8)
        up = projection("bld,df->blf", x_BLD, self.up[...], self.dtype, self.fp8)
        hidden = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        out = projection("blf,fd->bld", hidden, self.down[...], self.dtype, self.fp8)
        return constrain(out, ("act_batch", "act_length", "act_embed"))
