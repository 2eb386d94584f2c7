"""Grouped-query attention with optional QK-norm, RoPE, and causal + document (+ window) masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from plamo_jax.errors import ConfigError
from plamo_jax.models import kernels
from plamo_jax.models.attention_statistics import max_allowed_logit
from plamo_jax.models.context_attention import context_attention
from plamo_jax.models.cudnn_attention import (
    CUDNN_AUTO_MAX_LENGTH,
    cudnn_attention_with_max_logit,
    cudnn_unsupported,
)
from plamo_jax.models.flash_attention import flash_attention_with_max_logit
from plamo_jax.models.layers import RMSNorm, apply_rope, compute_dtype, normal, output_init_std, param
from plamo_jax.models.masks import attention_mask, cached_attention_mask, static_window
from plamo_jax.models.projection import projection
from plamo_jax.models.splash_attention import sharded_splash_attention
from plamo_jax.parallel import context
from plamo_jax.parallel.rules import constrain

QK_NORM_KINDS = ("none", "shared", "per_head")
# auto's choice off GPU (or past cuDNN's range): dense scores up to this length, flash beyond.
AUTO_DENSE_MAX_LENGTH = 2048
# Dense attention on CPU, over tokens in order, takes the queries in up to this many blocks of
# consecutive rows, none shorter than CAUSAL_MIN_ROWS (causal_dot_product_attention_with_max_logit).
CAUSAL_BLOCKS, CAUSAL_MIN_ROWS = 8, 64


def splash_unsupported(dtype, length: int, block: int) -> str | None:
    """Why the splash kernel cannot take these inputs, or None when it can."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"splash attention needs float32 or bfloat16 inputs, got {jnp.dtype(dtype).name}"
    if length % min(block, length):
        return (f"splash attention needs the length ({length}) to be a multiple of "
                f"model.attention_block ({block})")
    return None


def resolve_attention_impl(impl: str, dtype, head_dim: int, length: int, block: int = 512) -> str:
    """The kernel `impl` means for these shapes on the platform being traced for.

    auto: splash attention on TPU where it takes the inputs (models/splash_attention.py); cuDNN's fused
    attention on GPU where it does and the row is at most CUDNN_AUTO_MAX_LENGTH tokens
    (models/cudnn_attention.py); otherwise dense scores for short rows and flash attention (memory
    linear in length) for long ones. An explicit "cudnn" or "splash" off its platform or on inputs its
    kernel does not take is a configuration error, named here rather than deep inside JAX.
    """
    platform = kernels.target_platform()
    if impl == "auto":
        cudnn_applies = cudnn_unsupported(dtype, head_dim) is None and length <= CUDNN_AUTO_MAX_LENGTH
        if platform == "gpu" and cudnn_applies:
            return "cudnn"
        if platform == "tpu" and splash_unsupported(dtype, length, block) is None:
            return "splash"
        return "dense" if length <= AUTO_DENSE_MAX_LENGTH else "flash"
    kernel_platform = {"cudnn": "gpu", "splash": "tpu"}.get(impl)
    if kernel_platform and platform != kernel_platform:
        device = "an NVIDIA GPU" if kernel_platform == "gpu" else "a TPU"
        raise ConfigError(f"config key model.attention_impl={impl!r}: needs {device}, tracing for "
                          f"{platform}; expected auto, dense or flash here")
    reason = {"cudnn": lambda: cudnn_unsupported(dtype, head_dim),
              "splash": lambda: splash_unsupported(dtype, length, block)}.get(impl, lambda: None)()
    if reason:
        raise ConfigError(f"config key model.attention_impl={impl!r}: {reason}")
    return impl


def dot_product_attention(
    q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_B1TS: jax.Array
) -> jax.Array:
    """Softmax attention in fp32; query head h reads KV head h // (H / K) (Llama / HF layout)."""
    return dot_product_attention_with_max_logit(q_BTHD, k_BSKD, v_BSKD, mask_B1TS)[0]


def dot_product_attention_with_max_logit(
    q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_B1TS: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(attention output, the largest scaled score any query attends to: what QK-norm bounds).

    T queries over S keys (T == S in training, T new tokens over the cache in decoding). Heads come
    first and each KV head's group of query heads is merged with the query rows, so both products are
    plain batched matmuls over (batch, KV head) whose [rows, S] score operands XLA need not transpose:
    with [b, q, k, g, d] operands XLA CPU copied the score-sized tensors transposed in the forward
    and the backward (the dense attention of the 125.8M Llama shape of benchmarks/bench_peers.py took
    1.7x as long per layer).
    """
    batch, q_len, num_heads, head_dim = q_BTHD.shape
    kv_len, num_kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
    group = num_heads // num_kv_heads
    q_BKRD = (q_BTHD.reshape(batch, q_len, num_kv_heads, group, head_dim)
              .transpose(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, group * q_len, head_dim))
    k_BKSD, v_BKSD = k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkrd,bksd->bkrs", q_BKRD, k_BKSD, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, num_kv_heads, group, q_len, kv_len) * (head_dim**-0.5)
    allowed = mask_B1TS[:, :, None]
    max_logit = jnp.max(jnp.where(allowed, jax.lax.stop_gradient(scores), -jnp.inf))
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKD.dtype)
    out = jnp.einsum("bkrs,bksd->bkrd", probs.reshape(batch, num_kv_heads, group * q_len, kv_len), v_BKSD)
    out = out.reshape(batch, num_kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, num_heads, head_dim), max_logit


def causal_query_blocks(length: int) -> list[tuple[int, int]]:
    """(start, end) of each block of query rows: CAUSAL_BLOCKS equal blocks, fewer for short rows."""
    rows = max(CAUSAL_MIN_ROWS, -(-length // CAUSAL_BLOCKS))
    return [(start, min(start + rows, length)) for start in range(0, length, rows)]


def causal_dot_product_attention_with_max_logit(
    q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_B1TS: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`dot_product_attention_with_max_logit` for a causal mask over T == S tokens in order.

    No query attends to a later key, so the block of queries [start, end) reads only keys [0, end):
    the products, the score-sized selects and exponentials, and the scores kept for the backward
    pass skip most of the masked upper triangle that the one-block form computes and throws away
    (8 blocks do 56% of its work; one 125.8M-Llama attention layer's forward + backward on 2 CPU
    cores took about half the time, benchmarks/bench_attention.py). A skipped key has probability
    exactly 0 there, so each row's softmax is the same.
    """
    outputs, maxima = [], []
    for start, end in causal_query_blocks(q_BTHD.shape[1]):
        attended, max_logit = dot_product_attention_with_max_logit(
            q_BTHD[:, start:end], k_BSKD[:, :end], v_BSKD[:, :end], mask_B1TS[:, :, start:end, :end])
        outputs.append(attended)
        maxima.append(max_logit)
    return jnp.concatenate(outputs, axis=1), jnp.max(jnp.stack(maxima))


class Attention(nnx.Module):
    """Projections q/k/v [embed, heads, head_dim] and o [heads, head_dim, embed], no biases.

    qk_norm: "none"; "shared" = one RMSNorm weight [head_dim] for all heads (Qwen3, PLaMo-100B style);
    "per_head" = a weight per head [heads, head_dim] (PLaMo 2). Applied before RoPE.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope_theta: float,
        norm_eps: float,
        qk_norm: str,
        init_std: float,
        out_init_std: float,
        dtype,
        rngs: nnx.Rngs,
        fp8: bool = False,
        impl: str = "dense",
        block: int = 512,
        context_parallel: str = "none",
    ):
        if qk_norm not in QK_NORM_KINDS:
            raise ConfigError(f"qk_norm={qk_norm!r}: expected one of {QK_NORM_KINDS}")
        if num_heads % num_kv_heads:
            raise ConfigError(f"config key model.num_heads={num_heads}: expected a multiple of "
                              f"model.num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.dtype = dtype
        self.fp8 = fp8
        self.impl, self.block = impl, block
        self.context_parallel = context_parallel
        self.q_proj = param(
            rngs, normal(init_std), (d_model, num_heads, head_dim), ("embed", "heads", "head_dim")
        )
        self.k_proj = param(
            rngs, normal(init_std), (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim")
        )
        self.v_proj = param(
            rngs, normal(init_std), (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim")
        )
        self.o_proj = param(
            rngs, normal(out_init_std), (num_heads, head_dim, d_model), ("heads", "head_dim", "embed")
        )
        q_norm = k_norm = None
        if qk_norm == "shared":
            q_norm = RMSNorm(head_dim, eps=norm_eps, rngs=rngs, logical_axes=("head_dim",))
            k_norm = RMSNorm(head_dim, eps=norm_eps, rngs=rngs, logical_axes=("head_dim",))
        elif qk_norm == "per_head":
            q_norm = PerHeadRMSNorm(num_heads, head_dim, eps=norm_eps, heads_axis="heads", rngs=rngs)
            k_norm = PerHeadRMSNorm(num_kv_heads, head_dim, eps=norm_eps, heads_axis="kv_heads", rngs=rngs)
        self.q_norm = nnx.data(q_norm)
        self.k_norm = nnx.data(k_norm)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, *, qk_norm: str, rngs: nnx.Rngs) -> Attention:
        """Attention with the model config's shapes, RoPE, dtype, initialisation, FP8 and kernel."""
        return cls(
            d_model=cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps, qk_norm=qk_norm, init_std=cfg.init_std,
            out_init_std=output_init_std(cfg), dtype=compute_dtype(cfg), rngs=rngs, fp8=cfg.fp8,
            impl=cfg.attention_impl, block=cfg.attention_block, context_parallel=cfg.context_parallel,
        )

    # --- cached decoding (dense and MoE families) ------------------------------------------------------

    def init_cache(self, batch: int, max_length: int) -> dict[str, jax.Array]:
        """Empty keys and values [batch, max_length, kv_heads, head_dim] in the compute dtype."""
        shape = (batch, max_length, self.num_kv_heads, self.head_dim)
        return {"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype)}

    def extend(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        start: int | jax.Array,
        cache: dict[str, jax.Array],
        key_valid_BS: jax.Array,
        window: int | jax.Array = 0,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Attention of T new tokens written to cache columns start..start+T-1: (output, new cache).

        Columns are shared by the rows of a batch (one write index), positions are per row, so rows of
        different lengths decode together left-padded; `key_valid_BS` marks the columns holding a real
        token of the row (padding never is). The result equals the full forward pass over the row.
        """
        q, k, v = self.project_qkv(x_BTD, positions_BT)
        write = jax.lax.dynamic_update_slice_in_dim
        keys = write(cache["key"], k.astype(cache["key"].dtype), start, 1)
        values = write(cache["value"], v.astype(cache["value"].dtype), start, 1)
        query_columns_T = start + jnp.arange(x_BTD.shape[1])
        mask = cached_attention_mask(query_columns_T, key_valid_BS, window)
        attended = dot_product_attention(q, keys, values, mask)
        return self.project_out(attended), {"key": keys, "value": values}

    def project_qkv(self, x_BLD: jax.Array, positions_BL: jax.Array):
        """q, k, v after QK-norm and RoPE (exposed for recurrent decoding with a KV cache)."""
        q, k, v = (
            projection("bld,dhk->blhk", x_BLD, weight[...], self.dtype, self.fp8)
            for weight in (self.q_proj, self.k_proj, self.v_proj)
        )
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions_BL, self.rope_theta)
        k = apply_rope(k, positions_BL, self.rope_theta)
        return q, k, v

    def project_out(self, attended_BLHD: jax.Array) -> jax.Array:
        out = projection("blhk,hkd->bld", attended_BLHD, self.o_proj[...], self.dtype, self.fp8)
        return constrain(out, ("act_batch", "act_length", "act_embed"))

    def __call__(
        self,
        x_BLD: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL: jax.Array,
        window: int | jax.Array = 0,
    ) -> jax.Array:
        return self.attend(x_BLD, segment_ids_BL, positions_BL, window)[0]

    def attend(
        self,
        x_BLD: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL: jax.Array,
        window: int | jax.Array = 0,
    ) -> tuple[jax.Array, jax.Array]:
        """(output, the largest attention logit: a health statistic blocks report as aux)."""
        q, k, v = self.project_qkv(x_BLD, positions_BL)
        if self.context_parallel != "none" and context.sequence_shards() > 1:
            # Context parallelism: queries, keys and values stay sharded along the sequence.
            attended, max_logit = context_attention(q, k, v, segment_ids_BL, window,
                                                            strategy=self.context_parallel, block=self.block)
            return self.project_out(attended), max_logit
        # Sequence parallelism ends here: attention sees the whole sequence, heads stay sharded.
        q = constrain(q, ("act_batch", None, "act_heads", "act_head_dim"))
        k = constrain(k, ("act_batch", None, "act_kv_heads", "act_head_dim"))
        v = constrain(v, ("act_batch", None, "act_kv_heads", "act_head_dim"))
        tokens = context.layout_tokens(x_BLD.shape[1])
        impl = resolve_attention_impl(self.impl, q.dtype, self.head_dim, x_BLD.shape[1], self.block)
        if impl == "splash" and (tokens is not None or static_window(window) is None):
            # splash builds its mask ahead of tracing: a per-layer (traced) window or a permuted token
            # order cannot go in; auto takes flash there, an explicit request is an error
            if self.impl != "auto":
                raise ConfigError("config key model.attention_impl='splash': the attention window differs "
                                  "between layers (model.full_attention_layers) or the tokens are permuted "
                                  "(context load balancing); expected auto or flash")
            impl = "flash"
        if impl == "splash":
            attended = sharded_splash_attention(q, k, v, segment_ids_BL, static_window(window),
                                                block=self.block, interpret=kernels.interpret_pallas())
            max_logit = max_allowed_logit(q, k, attention_mask(segment_ids_BL, window))
        elif impl == "flash":
            attended, max_logit = flash_attention_with_max_logit(q, k, v, segment_ids_BL, window, self.block,
                                                                 tokens)
        elif impl == "cudnn":
            attended, max_logit = cudnn_attention_with_max_logit(q, k, v, segment_ids_BL, window, tokens)
        elif tokens is None and kernels.target_platform() == "cpu":
            # measured on CPU only; on GPU and TPU auto takes cuDNN or splash attention, which skip
            # masked blocks themselves, and an explicit dense keeps one block
            mask = attention_mask(segment_ids_BL, window)
            attended, max_logit = causal_dot_product_attention_with_max_logit(q, k, v, mask)
        else:
            mask = attention_mask(segment_ids_BL, window, tokens)
            attended, max_logit = dot_product_attention_with_max_logit(q, k, v, mask)
        attended = constrain(attended, ("act_batch", None, "act_heads", "act_head_dim"))
        return self.project_out(attended), max_logit


class PerHeadRMSNorm(nnx.Module):
    """RMS-normalise each head over head_dim, then scale by a per-head weight (initialised to 1)."""

    def __init__(self, num_heads: int, head_dim: int, *, eps: float, heads_axis: str, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, jax.nn.initializers.ones, (num_heads, head_dim), (heads_axis, "head_dim"))

    def __call__(self, x_BLHD: jax.Array) -> jax.Array:
        x = x_BLHD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BLHD.dtype)
