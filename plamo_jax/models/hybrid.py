"""PLaMo 2 / Samba hybrid: groups of `mamba_step` layers, Mamba everywhere except one attention layer.

Layer i is attention when i % mamba_step == mamba_step // 2 (PLaMo 2's rule), so every scanned group of
`mamba_step` consecutive layers has the same pattern. Each layer is
    x = x + post_mixer_norm(mixer(pre_mixer_norm(x)));  x = x + post_mlp_norm(mlp(pre_mlp_norm(x)))
with norm scales stored as deltas from 1, 1/5, 1, 1/5**1.5 (PLaMo 2's checkpoint format).

Generation: `init_cache` / `extend` run the whole model over new tokens with a per-layer cache
(conv inputs and SSM state for Mamba layers, keys and values for attention layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from plamo_jax.models import flops
from plamo_jax.models.attention import Attention, dot_product_attention
from plamo_jax.models.dense import validate_mlp
from plamo_jax.models.family import SHARED_ACTIVATION_SHARDS, FamilySpec, MemoryPart, MeshSizes, require
from plamo_jax.models.layers import RMSNorm, SwiGLU, compute_dtype, output_init_std
from plamo_jax.models.ssm import MambaMixer, mamba_flops_per_token
from plamo_jax.parallel.context import SSM_LAYOUTS

NORM_OFFSETS = {"pre_mixer_norm": 1.0, "post_mixer_norm": 1.0 / 5, "pre_mlp_norm": 1.0,
                "post_mlp_norm": 1.0 / 5**1.5}


def attention_position(cfg: ml_collections.ConfigDict) -> int:
    """Index, within a group, of the attention layer."""
    return cfg.mamba_step // 2


def is_mamba_layer(cfg: ml_collections.ConfigDict, layer_index: int) -> bool:
    return layer_index % cfg.mamba_step != attention_position(cfg)


def layer_name(position: int) -> str:
    """Attribute (and parameter-path key) of the layer at `position` within a group."""
    return f"layer_{position}"


def validate(cfg: ml_collections.ConfigDict, sizes: MeshSizes) -> None:
    require(cfg.mamba_step >= 2, "mamba_step", cfg.mamba_step,
            ">= 2 (one attention layer per group of mamba_step layers)")
    HYBRID.num_blocks(cfg)
    for index in cfg.full_attention_layers:
        require(0 <= index < cfg.num_layers and not is_mamba_layer(cfg, index), "full_attention_layers",
                tuple(cfg.full_attention_layers),
                f"attention layers of the {cfg.num_layers} (layer {index} is not one)")
    require(cfg.attention_window >= 0, "attention_window", cfg.attention_window, ">= 0")
    for key, minimum in (("ssm_num_heads", 1), ("ssm_head_dim", 1), ("ssm_state_dim", 1),
                         ("ssm_conv_width", 2), ("ssm_chunk_size", 1)):
        require(cfg[key] >= minimum, key, cfg[key], f">= {minimum}")
    require(cfg.ssm_context_layout in SSM_LAYOUTS, "ssm_context_layout", cfg.ssm_context_layout,
            f"one of {SSM_LAYOUTS}")
    require(cfg.ssm_num_heads % sizes["tensor"] == 0, "ssm_num_heads", cfg.ssm_num_heads,
            f"divisible by the tensor-parallel mesh size mesh.tensor={sizes['tensor']}")
    validate_mlp(cfg, sizes)


def make_mamba(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MambaMixer:
    return MambaMixer(
        d_model=cfg.d_model, num_heads=cfg.ssm_num_heads, head_dim=cfg.ssm_head_dim,
        state_dim=cfg.ssm_state_dim, conv_width=cfg.ssm_conv_width, chunk_size=cfg.ssm_chunk_size,
        norm_eps=cfg.norm_eps, init_std=cfg.init_std, out_init_std=output_init_std(cfg),
        dtype=compute_dtype(cfg), rngs=rngs, fp8=cfg.fp8, context_layout=cfg.ssm_context_layout,
    )


class HybridLayer(nnx.Module):
    """One PLaMo 2 decoder layer with a Mamba or an attention mixer."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, is_mamba: bool, rngs: nnx.Rngs):
        self.is_mamba = is_mamba

        def norm(name):
            return RMSNorm(cfg.d_model, eps=cfg.norm_eps, offset=NORM_OFFSETS[name], rngs=rngs)

        self.pre_mixer_norm = norm("pre_mixer_norm")
        if is_mamba:
            self.mixer = make_mamba(cfg, rngs)
        else:
            self.mixer = Attention.from_config(cfg, qk_norm="per_head", rngs=rngs)
        self.post_mixer_norm = norm("post_mixer_norm")
        self.pre_mlp_norm = norm("pre_mlp_norm")
        self.mlp = SwiGLU.from_config(cfg, cfg.mlp_dim, rngs=rngs)
        self.post_mlp_norm = norm("post_mlp_norm")

    def add_mixer(self, x_BLD, mixed_BLD):
        return x_BLD + self.post_mixer_norm(mixed_BLD)

    def add_mlp(self, x_BLD):
        return x_BLD + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x_BLD)))


class HybridGroup(nnx.Module):
    """`mamba_step` consecutive PLaMo 2 layers: one scanned block of the decoder."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.layers_per_group = cfg.mamba_step
        self.attention_window = cfg.attention_window
        self.full_attention_layers = tuple(int(i) for i in cfg.full_attention_layers)
        # Named attributes rather than a list: parameter paths get string keys ("layer_0"), which survive
        # checkpoint round trips unchanged (Orbax would turn integer list keys into strings).
        self.layer_names = tuple(layer_name(j) for j in range(cfg.mamba_step))
        for j, name in enumerate(self.layer_names):
            setattr(self, name, HybridLayer(cfg, is_mamba=is_mamba_layer(cfg, j), rngs=rngs))

    @property
    def layers(self) -> list[HybridLayer]:
        return [getattr(self, name) for name in self.layer_names]

    def window(self, layer_index: jax.Array) -> int | jax.Array:
        """Sliding window of an attention layer (0 = full); layer_index may be traced. A Python int when
        every attention layer has the same window (context parallelism's ring then skips the steps it
        rules out)."""
        if not self.full_attention_layers:
            return self.attention_window
        full = jnp.isin(layer_index, jnp.asarray(self.full_attention_layers or (-1,), jnp.int32))
        return jnp.where(full, 0, self.attention_window)

    def __call__(self, x_BLD, segment_ids_BL, positions_BL, block_index):
        max_logits = []
        for j, layer in enumerate(self.layers):
            hidden = layer.pre_mixer_norm(x_BLD)
            if layer.is_mamba:
                mixed = layer.mixer(hidden, segment_ids_BL)
            else:
                window = self.window(block_index * self.layers_per_group + j)
                mixed, max_logit = layer.mixer.attend(hidden, segment_ids_BL, positions_BL, window)
                max_logits.append(max_logit)
            x_BLD = layer.add_mlp(layer.add_mixer(x_BLD, mixed))
        return x_BLD, {"max_attention_logit": jnp.max(jnp.stack(max_logits))}

    # --- recurrent generation -------------------------------------------------------------------------

    def init_cache(self, batch: int, max_length: int) -> dict[str, jax.Array]:
        cache: dict[str, jax.Array] = {}
        for j, layer in enumerate(self.layers):
            if layer.is_mamba:
                for name, value in layer.mixer.init_cache(batch).items():
                    cache[f"{j}/{name}"] = value
            else:
                attn = layer.mixer
                shape = (batch, max_length, attn.num_kv_heads, attn.head_dim)
                cache[f"{j}/key"] = jnp.zeros(shape, attn.dtype)
                cache[f"{j}/value"] = jnp.zeros(shape, attn.dtype)
        return cache

    def extend(self, x_BTD, start, cache, block_index):
        """T new tokens at positions start..start+T-1 of one document per row; returns (x, new cache)."""
        length = x_BTD.shape[1]
        positions_T = start + jnp.arange(length)
        new_cache = dict(cache)
        for j, layer in enumerate(self.layers):
            hidden = layer.pre_mixer_norm(x_BTD)
            if layer.is_mamba:
                state = {"conv": cache[f"{j}/conv"], "ssm": cache[f"{j}/ssm"]}
                mixed, state = layer.mixer.extend(hidden, state)
                new_cache[f"{j}/conv"], new_cache[f"{j}/ssm"] = state["conv"], state["ssm"]
            else:
                attn = layer.mixer
                positions_BT = jnp.broadcast_to(positions_T, x_BTD.shape[:2])
                q, k, v = attn.project_qkv(hidden, positions_BT)
                write = jax.lax.dynamic_update_slice_in_dim
                keys = write(cache[f"{j}/key"], k.astype(attn.dtype), start, 1)
                values = write(cache[f"{j}/value"], v.astype(attn.dtype), start, 1)
                new_cache[f"{j}/key"], new_cache[f"{j}/value"] = keys, values
                key_positions = jnp.arange(keys.shape[1])
                window = self.window(block_index * self.layers_per_group + j)
                distance = positions_T[:, None] - key_positions[None, :]
                mask_TS = (distance >= 0) & ((window <= 0) | (distance < window))
                mask = jnp.broadcast_to(mask_TS, (x_BTD.shape[0], 1) + mask_TS.shape)
                mixed = attn.project_out(dot_product_attention(q, keys, values, mask))
            x_BTD = layer.add_mlp(layer.add_mixer(x_BTD, mixed))
        return x_BTD, new_cache


def init_cache(model, batch: int, max_length: int) -> dict[str, jax.Array]:
    """Empty generation cache for every group, stacked along a leading blocks axis."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def per_block(block):
        return block.init_cache(batch, max_length)

    return per_block(model.blocks)


def extend(model, input_ids_BT: jax.Array, start, cache):
    """Run T new tokens (positions start..start+T-1) through the model: (fp32 logits [B, T, V], cache).

    Prefill is `extend(model, prompt, 0, init_cache(...))`; decoding feeds one token at a time.
    """
    x = model.embed_tokens(input_ids_BT)

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
    def run_stack(x_BTD, block, block_cache, block_index):
        return block.extend(x_BTD, start, block_cache, block_index)

    x, cache = run_stack(x, model.blocks, cache, jnp.arange(model.num_blocks))
    return model.logits(x), cache


@nnx.jit
def _extend_jit(model, input_ids_BT, start, cache):
    return extend(model, input_ids_BT, start, cache)


def greedy_generate(model, prompt_ids_BT: jax.Array, max_new_tokens: int) -> jax.Array:
    """Greedy continuation [B, max_new_tokens] of equal-length prompts: one prefill, then one token a step.

    The KV cache holds prompt + new tokens (sliding-window layers keep every key; a ring buffer would
    bound them to the window).
    """
    batch, prompt_length = prompt_ids_BT.shape
    cache = init_cache(model, batch, prompt_length + max_new_tokens)
    logits, cache = _extend_jit(model, prompt_ids_BT, 0, cache)
    generated = []
    for step in range(max_new_tokens):
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        generated.append(token)
        if step + 1 < max_new_tokens:
            logits, cache = _extend_jit(model, token[:, None], prompt_length + step, cache)
    return jnp.stack(generated, axis=1)


# ----------------------------------------------------------------------------------- the family spec


def forward_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """One attention layer per group of mamba_step layers (full-attention layers see every key)."""
    groups = cfg.num_layers // cfg.mamba_step
    full = [i for i in cfg.full_attention_layers if not is_mamba_layer(cfg, i)]
    windowed = flops.attention_flops_per_token(cfg, seq_len, cfg.attention_window)
    mixers = (groups - len(full)) * windowed + len(full) * flops.attention_flops_per_token(cfg, seq_len)
    mixers += (cfg.num_layers - groups) * mamba_flops_per_token(cfg)
    mlps = cfg.num_layers * flops.swiglu_flops_per_token(cfg.d_model, cfg.mlp_dim)
    return mixers + mlps + flops.lm_head_flops_per_token(cfg)


def _mamba_mixers(group: HybridGroup):
    return [(layer.mixer, lambda mixer, x_BLD, segment_ids_BL: mixer(x_BLD, segment_ids_BL))
            for layer in group.layers if layer.is_mamba]


HYBRID = FamilySpec(
    name="hybrid",
    block=HybridGroup,
    validate=validate,
    architecture_keys=("mlp_dim", "mamba_step", "ssm_num_heads", "ssm_head_dim", "ssm_state_dim",
                       "ssm_conv_width"),
    forward_flops_per_token=forward_flops_per_token,
    # PLaMo 2: one scanned block is a group of `mamba_step` layers holding one attention layer.
    layers_per_block=lambda cfg: cfg.mamba_step,
    activation_shards={**SHARED_ACTIVATION_SHARDS, "mlp_dim": "act_mlp", "ssm_num_heads": "act_ssm_heads"},
    memory_part=MemoryPart("SSM state, conv and chunk buffers", "Mamba mixers", _mamba_mixers),
    hf_formats=("plamo2",),
    default_hf_format=lambda cfg: "plamo2",
    final_norm_offset=1.0,  # the final norm stores a delta from 1
)
