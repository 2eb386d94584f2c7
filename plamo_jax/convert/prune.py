"""Structured pruning (Minitron) and function-preserving growth of a checkpoint, for every family.

    scores = calibrate(model_cfg, params, batches)                  # importance from activations
    keep = choose_indices(model_cfg, scores, target)              # or random_scores(...) for a baseline
    small_params, small_cfg = prune_params(params, model_cfg, keep, target)
    grown_params, grown_cfg, sources = grow_params(params, model_cfg, new_layers)   # depth, same logits
    wide_params, wide_cfg = grow_width(params, model_cfg, {"mlp_dim": 768})           # width, same logits

Importance (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"), summed over calibration tokens (padding excluded):
    hidden channels  mean |x| of the residual-stream norm outputs, summed over every such norm
    attention heads  L2 norm over head_dim of the input of the output projection, per layer
    MLP neurons      |input of the down projection| (silu(gate) * up), per layer
    experts (MoE)    router load: tokens the layer sends to each expert
    SSM heads        L2 norm over head_dim of the gated input of the Mamba out_proj, per layer
    depth            1 - cos(block input, block output), per scanned block
GQA: whole KV groups are kept or dropped (a group's score is the sum of its query heads'), then the
same number of query heads is kept in every kept group (the best of that group), so query head h still
reads KV head h // (H / K) after pruning. Depth prunes whole scanned blocks (PLaMo 2 groups of
`mamba_step` layers for the hybrid).

Parameters are pure nested dicts stacked over blocks. Which dimension a parameter axis is comes from
the parameter's logical axes (`state.abstract_model`): "embed" is d_model, "heads"/"kv_heads"/"mlp"/
"expert"/"ssm_heads" the widths of the family's `PruneLayout`, so slicing is one generic function;
a family's layout says only what its logical axes do not (an axis tagged None, a norm inside a mixer)
and how to re-run its block with probes. A new family plugs in with one `PruneLayout` entry in
`LAYOUTS`, keyed by its block class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from plamo_jax.errors import ConfigError
from plamo_jax.models import registry
from plamo_jax.models.attention import dot_product_attention
from plamo_jax.models.decoder import UNSHARDED, Decoder
from plamo_jax.models.dense import DenseBlock
from plamo_jax.models.family import FamilySpec
from plamo_jax.models.hybrid import HybridGroup
from plamo_jax.models.layers import SwiGLU
from plamo_jax.models.masks import attention_mask
from plamo_jax.models.moe import MoEBlock, MoEMLP
from plamo_jax.models.projection import projection
from plamo_jax.models.ssm import causal_conv, document_index, ssd_chunked
from plamo_jax.train import state as state_lib

Scope = tuple[str, ...]  # a module path inside a block whose parameters share one set of kept indices
ScoreKey = tuple[Scope, str]  # (scope, logical axis)
Probe = Callable[..., tuple[jax.Array, dict]]

EMBED, LAYERS = "embed", "layers"
GLOBAL: Scope = ()  # d_model: one set of channels for the whole model
# Widths every attention family has: logical axis -> model config key.
ATTENTION_WIDTHS = {"heads": "num_heads", "kv_heads": "num_kv_heads"}


@dataclasses.dataclass(frozen=True)
class PruneLayout:
    """What pruning needs to know about a family beyond its parameters' logical axes.

    widths: prunable logical axes inside a block -> the model config key of their size.
    probe: (block, x_BLD, segment_ids_BL, positions_BL, block_index, mask_BL) -> (block output,
        {(scope, axis): score summed over tokens}); the block's forward re-run from its pieces.
    axis_overrides: parameter path suffix -> its logical axes (without "layers") where the model's
        tags say something else: a router's expert axis is tagged None (it is not sharded), the norms
        inside a Mamba mixer are tagged "norm" like the residual norms but are not d_model wide.
    mixes: parameter path suffixes, beyond the projections into the residual stream, that sum a width's
        entries into something every entry reads (the Mamba bcdt_proj makes B, C and dt from all
        heads); width growth zeroes them at the new entries so that the old ones compute what they did.
    """

    widths: Mapping[str, str]
    probe: Probe
    axis_overrides: Mapping[tuple[str, ...], tuple[str | None, ...]] = dataclasses.field(default_factory=dict)
    mixes: tuple[tuple[str, ...], ...] = ()


# ----------------------------------------------------------------------------------- probes


def token_sum(values_BL_: jax.Array, mask_BL: jax.Array) -> jax.Array:
    """Sum over the calibration tokens (padding excluded) of a [B, L, ...] statistic."""
    mask = mask_BL.reshape(mask_BL.shape + (1,) * (values_BL_.ndim - 2))
    return jnp.sum(values_BL_.astype(jnp.float32) * mask, axis=(0, 1))


def head_magnitude(x_BLHK: jax.Array, mask_BL: jax.Array) -> jax.Array:
    return token_sum(jnp.linalg.norm(x_BLHK.astype(jnp.float32), axis=-1), mask_BL)


def probe_attention(attn, h_BLD, segment_ids_BL, positions_BL, window, mask_BL):
    """(attention output, score of each query head): the dense-kernel path of `Attention.attend`."""
    q, k, v = attn.project_qkv(h_BLD, positions_BL)
    attended = dot_product_attention(q, k, v, attention_mask(segment_ids_BL, window))
    return attn.project_out(attended), head_magnitude(attended, mask_BL)


def probe_swiglu(mlp: SwiGLU, h_BLD, mask_BL):
    """(MLP output, score of each neuron): |input of the down projection|."""
    gate = projection("bld,df->blf", h_BLD, mlp.gate[...], mlp.dtype, mlp.fp8)
    up = projection("bld,df->blf", h_BLD, mlp.up[...], mlp.dtype, mlp.fp8)
    hidden = jax.nn.silu(gate) * up
    out = projection("blf,fd->bld", hidden, mlp.down[...], mlp.dtype, mlp.fp8)
    return out, token_sum(jnp.abs(hidden), mask_BL)


def probe_mlp(mlp, h_BLD, scope: Scope, mask_BL):
    """A dense SwiGLU scores its neurons; an MoE MLP scores its experts by router load."""
    if isinstance(mlp, MoEMLP):
        out, aux = mlp(h_BLD)
        return out, {(scope, "expert"): aux["tokens_per_expert"]}
    out, neurons = probe_swiglu(mlp, h_BLD, mask_BL)
    return out, {(scope, "mlp"): neurons}


def probe_mamba(mixer, h_BLD, segment_ids_BL, mask_BL):
    """(Mamba output, score of each SSM head): `MambaMixer.__call__` on one device, up to out_proj."""
    z, x = mixer._project_in(h_BLD)
    x = jax.nn.silu(causal_conv(x, mixer.conv[...].astype(mixer.dtype), segment_ids_BL))
    b, c, dt = mixer._ssm_inputs(x)
    y, _ = ssd_chunked(x, dt, mixer.A(), b, c, document_index(segment_ids_BL), chunk_size=mixer.chunk_size)
    y = y + mixer.D[...][:, None] * x.astype(jnp.float32)
    y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(mixer.dtype)
    out = projection("blhp,hpd->bld", y, mixer.out_proj[...], mixer.dtype, mixer.fp8)
    return out, head_magnitude(y, mask_BL)


def channel_magnitude(h_BLD, mask_BL):
    return token_sum(jnp.abs(h_BLD), mask_BL)


def probe_pre_norm_block(block, x_BLD, segment_ids_BL, positions_BL, block_index, mask_BL):
    """DenseBlock / MoEBlock: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x))."""
    del block_index  # every layer is the same
    h = block.attn_norm(x_BLD)
    channels = channel_magnitude(h, mask_BL)
    attended, heads = probe_attention(block.attn, h, segment_ids_BL, positions_BL, 0, mask_BL)
    x_BLD = x_BLD + attended
    h = block.mlp_norm(x_BLD)
    channels = channels + channel_magnitude(h, mask_BL)
    out, mlp_scores = probe_mlp(block.mlp, h, ("mlp",), mask_BL)
    return x_BLD + out, {(GLOBAL, EMBED): channels, (("attn",), "heads"): heads, **mlp_scores}


def probe_hybrid_group(group, x_BLD, segment_ids_BL, positions_BL, block_index, mask_BL):
    """HybridGroup: each layer's mixer (Mamba or attention) and MLP, with PLaMo 2's four norms."""
    scores: dict = {}
    channels = 0.0
    for j, (name, layer) in enumerate(zip(group.layer_names, group.layers, strict=True)):
        h = layer.pre_mixer_norm(x_BLD)
        channels = channels + channel_magnitude(h, mask_BL)
        if layer.is_mamba:
            mixed, scores[((name, "mixer"), "ssm_heads")] = probe_mamba(
                layer.mixer, h, segment_ids_BL, mask_BL)
        else:
            window = group.window(block_index * group.layers_per_group + j)
            mixed, scores[((name, "mixer"), "heads")] = probe_attention(
                layer.mixer, h, segment_ids_BL, positions_BL, window, mask_BL)
        x_BLD = layer.add_mixer(x_BLD, mixed)
        h = layer.pre_mlp_norm(x_BLD)
        channels = channels + channel_magnitude(h, mask_BL)
        out, mlp_scores = probe_mlp(layer.mlp, h, (name, "mlp"), mask_BL)
        scores.update(mlp_scores)
        x_BLD = x_BLD + layer.post_mlp_norm(out)
    return x_BLD, {(GLOBAL, EMBED): channels, **scores}


# One entry per family, keyed by the block class its FamilySpec builds.
LAYOUTS: dict[type, PruneLayout] = {
    DenseBlock: PruneLayout(widths={**ATTENTION_WIDTHS, "mlp": "mlp_dim"}, probe=probe_pre_norm_block),
    MoEBlock: PruneLayout(widths={**ATTENTION_WIDTHS, "expert": "num_experts"}, probe=probe_pre_norm_block,
                          axis_overrides={("mlp", "router"): (EMBED, "expert")}),
    HybridGroup: PruneLayout(
        widths={**ATTENTION_WIDTHS, "mlp": "mlp_dim", "ssm_heads": "ssm_num_heads"},
        probe=probe_hybrid_group,
        axis_overrides={(norm, "scale"): (None,) for norm in ("dt_norm", "B_norm", "C_norm")},
        mixes=(("mixer", "bcdt_proj"),)),
}


def layout_of(family: FamilySpec) -> PruneLayout:
    if family.block not in LAYOUTS:
        raise ConfigError(f"model.family={family.name!r} has no pruning layout; expected one of the families "
                          "in plamo_jax/convert/prune.py LAYOUTS")
    return LAYOUTS[family.block]


# ----------------------------------------------------------------------------------- calibration


def block_runner(model_cfg: ml_collections.ConfigDict, layout: PruneLayout):
    """jit(pure block params, x, segment ids, positions, block index, mask) -> (output, scores, depth)."""
    family = registry.get_family(model_cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: family.block(model_cfg, rngs=nnx.Rngs(0))))

    def run(pure_block, x_BLD, segment_ids_BL, positions_BL, block_index, mask_BL):
        state = jax.tree.map(lambda leaf: leaf, abstract)  # a fresh State to fill (replace mutates it)
        nnx.replace_by_pure_dict(state, pure_block)
        block = nnx.merge(graphdef, state)
        out_BLD, scores = layout.probe(block, x_BLD, segment_ids_BL, positions_BL, block_index, mask_BL)
        # Depth: a block that barely turns its input is one the model can do without.
        a, b = x_BLD.astype(jnp.float32), out_BLD.astype(jnp.float32)
        cosine = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)
        return out_BLD, scores, jnp.sum((1.0 - cosine) * mask_BL)

    return jax.jit(run)


def probe_batch(run_block, blocks: list, embed: jax.Array, batch: Mapping, dtype) -> tuple:
    """(last block's output, each block's scores, each block's depth score) of one batch."""
    mask = jnp.asarray(np.asarray(batch["loss_mask"]) > 0, jnp.float32)
    segment_ids, positions = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"])
    x = jnp.take(embed, jnp.asarray(batch["input_ids"]), axis=0).astype(dtype)
    per_block, depth = [], []
    for i, block in enumerate(blocks):
        x, scores, turned = run_block(block, x, segment_ids, positions, i, mask)
        per_block.append(scores)
        depth.append(float(turned))
    return x, per_block, depth


def host_blocks(model_cfg: ml_collections.ConfigDict, params: Mapping) -> list:
    """Each block's parameters, unstacked."""
    num_blocks = registry.get_family(model_cfg).num_blocks(model_cfg)
    return [jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), params["blocks"]) for i in range(num_blocks)]


def calibrate(model_cfg: ml_collections.ConfigDict, params: Mapping, batches: Iterable[Mapping]) -> dict:
    """Importance scores summed over `batches` (dicts of input_ids, segment_ids, positions, loss_mask).

    Returns {(scope, axis): array}: (GLOBAL, "embed") is [d_model]; block widths are [blocks, width];
    (GLOBAL, "layers") is [blocks]. Blocks run one at a time on the host's default device.
    """
    run_block = block_runner(model_cfg, layout_of(registry.get_family(model_cfg)))
    blocks = host_blocks(model_cfg, params)
    embed = jnp.asarray(params["embed"])
    totals: dict[ScoreKey, Any] = {}
    for batch in batches:
        _, per_block, depth = probe_batch(run_block, blocks, embed, batch, model_cfg.dtype)
        for key in per_block[0]:
            stacked = np.stack([np.asarray(scores[key], np.float64) for scores in per_block])
            totals[key] = totals.get(key, 0.0) + (stacked.sum(0) if key == (GLOBAL, EMBED) else stacked)
        totals[(GLOBAL, LAYERS)] = totals.get((GLOBAL, LAYERS), 0.0) + np.asarray(depth)
    if not totals:
        raise ConfigError("the calibration data gave no batch; expected --batches >= 1 of a non-empty source")
    return totals


def random_scores(scores: Mapping[ScoreKey, np.ndarray], seed: int) -> dict:
    """Scores of the same shapes drawn at random: the baseline that importance ranking must beat."""
    rng = np.random.default_rng(seed)
    return {key: rng.random(np.shape(value)) for key, value in scores.items()}


# ----------------------------------------------------------------------------------- choosing indices


def top_indices(scores: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` highest-scoring positions along the last axis, in their original order."""
    order = np.argsort(-np.asarray(scores), axis=-1, kind="stable")[..., :keep]
    return np.sort(order, axis=-1)


def choose_heads(scores_NH: np.ndarray, num_kv_heads: int, target_heads: int, target_kv_heads: int):
    """Per layer: the best KV groups whole, then the best query heads of each kept group in equal number.

    Returns (query heads [N, target_heads], KV heads [N, target_kv_heads]), ascending, so that kept query
    head j reads kept KV head j // (target_heads / target_kv_heads) as before.
    """
    layers, heads = scores_NH.shape
    group = heads // num_kv_heads
    per_group = target_heads // target_kv_heads
    grouped = scores_NH.reshape(layers, num_kv_heads, group)
    kv = top_indices(grouped.sum(-1), target_kv_heads)
    within = top_indices(np.take_along_axis(grouped, kv[..., None], axis=1), per_group)
    query = (kv[..., None] * group + within).reshape(layers, target_heads)
    return query, kv


def check_target(model_cfg: ml_collections.ConfigDict, target: Mapping[str, int]) -> None:
    """ConfigError naming the flag of a target larger than the model or of heads that cannot group."""
    family = registry.get_family(model_cfg)
    prunable = ("d_model", "num_layers", *layout_of(family).widths.values())
    for key, value in target.items():
        flag = "--" + key.replace("_", "-")
        if key not in prunable:
            raise ConfigError(f"{flag} {value}: model.family={family.name!r} has no model.{key} to prune; "
                              f"expected one of {', '.join('--' + k.replace('_', '-') for k in prunable)}")
        if not 1 <= value <= model_cfg[key]:
            raise ConfigError(f"{flag} {value}: expected 1 to the model's model.{key}={model_cfg[key]}")
    heads = target.get("num_heads", model_cfg.num_heads)
    kv_heads = target.get("num_kv_heads", model_cfg.num_kv_heads)
    group = model_cfg.num_heads // model_cfg.num_kv_heads
    if heads % kv_heads or heads // kv_heads > group:
        raise ConfigError(f"--num-heads {heads} --num-kv-heads {kv_heads}: expected the query heads to split "
                          f"evenly into the KV groups, at most the model's {group} query heads per group "
                          "(whole KV groups are kept, query heads equally per group)")
    per_block = family.layers_per_block(model_cfg)
    layers = target.get("num_layers", model_cfg.num_layers)
    if layers % per_block:
        raise ConfigError(f"--num-layers {layers}: expected a multiple of the {per_block} layers of one "
                          f"scanned block of family {family.name!r}")


def choose_indices(model_cfg: ml_collections.ConfigDict, scores: Mapping[ScoreKey, np.ndarray],
                   target: Mapping[str, int]) -> dict[ScoreKey, np.ndarray]:
    """Kept indices for `target` (model key -> new size; absent keys keep their size), over all blocks.

    (GLOBAL, "layers") holds the kept blocks; block widths hold [blocks, kept] for every block (the
    rows of dropped blocks are dropped with them by `prune_params`).
    """
    check_target(model_cfg, target)
    family = registry.get_family(model_cfg)
    layout = layout_of(family)
    size = lambda key: target.get(key, model_cfg[key])
    blocks = size("num_layers") // family.layers_per_block(model_cfg)
    keep = {(GLOBAL, LAYERS): top_indices(scores[(GLOBAL, LAYERS)], blocks),
            (GLOBAL, EMBED): top_indices(scores[(GLOBAL, EMBED)], size("d_model"))}
    for (scope, axis), value in scores.items():
        if scope == GLOBAL:
            continue
        if axis == "heads":
            keep[(scope, "heads")], keep[(scope, "kv_heads")] = choose_heads(
                value, model_cfg.num_kv_heads, size("num_heads"), size("num_kv_heads"))
        else:
            keep[(scope, axis)] = top_indices(value, size(layout.widths[axis]))
    return keep


# ----------------------------------------------------------------------------------- slicing


def flat_leaves(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        flat.update(flat_leaves(value, path) if isinstance(value, Mapping) else {path: value})
    return flat


def nested(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def parameter_axes(model_cfg: ml_collections.ConfigDict) -> dict[tuple[str, ...], tuple]:
    """Each parameter's logical axes, with the family's overrides and residual norms read as "embed"."""
    layout = layout_of(registry.get_family(model_cfg))
    _, _, logical = state_lib.abstract_model(model_cfg)
    axes = {}
    for path, tags in flat_leaves(logical).items():
        tags = tuple(tags)
        for suffix, override in layout.axis_overrides.items():
            if path[-len(suffix):] == suffix:
                tags = tags[:1] + tuple(override) if tags[:1] == (LAYERS,) else tuple(override)
        # RMSNorm scales are tagged "norm"; the ones not overridden scale the residual stream.
        axes[path] = tuple(EMBED if tag == "norm" else tag for tag in tags)
    return axes


def indices_for(path: tuple[str, ...], axis: str, keep: Mapping[ScoreKey, np.ndarray]):
    """The kept indices of one axis of the parameter at `path`: d_model's, or the innermost scope's."""
    if axis == EMBED:
        return keep[(GLOBAL, EMBED)]
    inner = path[1:]  # the path inside a block
    scopes = [scope for scope, a in keep if a == axis and scope and inner[:len(scope)] == scope]
    return keep[(max(scopes, key=len), axis)] if scopes else None


def slice_leaf(value: np.ndarray, path: tuple[str, ...], axes: tuple, keep: Mapping[ScoreKey, np.ndarray]):
    """`value` restricted to the kept blocks and, along every prunable axis, to the kept indices."""
    value = np.asarray(value)
    stacked = axes[:1] == (LAYERS,)
    if stacked:
        value = np.take(value, keep[(GLOBAL, LAYERS)], axis=0)
    for dim, axis in enumerate(axes):
        indices = indices_for(path, axis, keep) if axis not in (None, LAYERS) else None
        if indices is None:
            continue
        if indices.ndim == 1:
            value = np.take(value, indices, axis=dim)
        else:  # one index set per block: the kept blocks' rows, broadcast over the other axes
            rows = indices[keep[(GLOBAL, LAYERS)]]
            shape = [1] * value.ndim
            shape[0], shape[dim] = rows.shape
            value = np.take_along_axis(value, rows.reshape(shape), axis=dim)
    return value


def remap_layers(indices: Iterable[int], block_sources: list[int], per_block: int) -> tuple[int, ...]:
    """Layer indices (model.full_attention_layers) after blocks are kept, dropped or repeated."""
    chosen = set(int(i) for i in indices)
    return tuple(new * per_block + offset for new, old in enumerate(block_sources)
                 for offset in range(per_block) if old * per_block + offset in chosen)


def resized_config(model_cfg: ml_collections.ConfigDict, sizes: Mapping[str, int],
                   block_sources: list[int]) -> ml_collections.ConfigDict:
    """The model config with new sizes and blocks; ConfigError if the result is not a valid model."""
    family = registry.get_family(model_cfg)
    per_block = family.layers_per_block(model_cfg)
    new = ml_collections.ConfigDict(model_cfg.to_dict())
    new.update(dict(sizes))
    new.num_layers = len(block_sources) * per_block
    new.full_attention_layers = remap_layers(model_cfg.full_attention_layers, block_sources, per_block)
    if "num_experts" in sizes and new.num_experts_per_token > new.num_experts:
        raise ConfigError(f"--num-experts {new.num_experts}: expected at least model.num_experts_per_token="
                          f"{new.num_experts_per_token} experts")
    registry.validate_model(new, UNSHARDED)
    return new


def check_shapes(flat: Mapping[tuple[str, ...], np.ndarray], model_cfg: ml_collections.ConfigDict) -> None:
    """The new parameters have exactly the shapes of a model built from the new config."""
    _, abstract, _ = state_lib.abstract_model(model_cfg)
    expected = {path: tuple(leaf.shape) for path, leaf in flat_leaves(abstract).items()}
    for path, shape in expected.items():
        got = tuple(np.shape(flat[path])) if path in flat else None
        if got != shape:
            raise ConfigError(f"the pruned model's parameter {'/'.join(path)} would be {got}, but model "
                              f"shape {shape} follows from the target; pick another size (e.g. the hybrid's "
                              "dt projection width follows d_model)")


def prune_params(params: Mapping, model_cfg: ml_collections.ConfigDict, keep: Mapping[ScoreKey, np.ndarray],
                 target: Mapping[str, int]) -> tuple[dict, ml_collections.ConfigDict]:
    """(smaller parameters, smaller model config): every leaf sliced at the kept indices."""
    axes = parameter_axes(model_cfg)
    flat = {path: slice_leaf(value, path, axes[path], keep) for path, value in flat_leaves(params).items()}
    sizes = {key: value for key, value in target.items() if key != "num_layers"}
    new_cfg = resized_config(model_cfg, sizes, [int(i) for i in keep[(GLOBAL, LAYERS)]])
    check_shapes(flat, new_cfg)
    return nested(flat), new_cfg


# ----------------------------------------------------------------------------------- depth up-scaling


def grown_block_sources(num_blocks: int, new_blocks: int) -> list[int]:
    """Old block of each new position: the copies spread evenly, each right after its original."""
    copies = np.bincount(np.arange(new_blocks) * num_blocks // max(new_blocks, 1), minlength=num_blocks)
    return [old for old in range(num_blocks) for _ in range(1 + int(copies[old]))]


def writes_residual(axes: tuple) -> bool:
    """A block's projection into the residual stream: a matrix whose last axis is d_model (attention and
    SSM out_proj, MLP and expert down); input projections start with d_model, norms are vectors."""
    inner = axes[1:] if axes[:1] == (LAYERS,) else axes
    return len(inner) >= 2 and inner[-1] == EMBED


def grow_params(params: Mapping, model_cfg: ml_collections.ConfigDict, new_layers: int
                ) -> tuple[dict, ml_collections.ConfigDict, list[int]]:
    """Depth up-scaling: (params, config, old block of each new block) with `new_layers` more layers.

    Each added block is a copy of its neighbour with its residual output projections zeroed, so it adds
    exactly 0 to the residual stream and the grown model computes the same logits; training then moves
    the copies away from the identity (the zeroed matrices get gradients, their inputs are the copy's).
    """
    family = registry.get_family(model_cfg)
    per_block = family.layers_per_block(model_cfg)
    if new_layers < 1 or new_layers % per_block:
        raise ConfigError(f"--grow-layers {new_layers}: expected a positive multiple of the {per_block} "
                          f"layers of one scanned block of family {family.name!r}")
    num_blocks = family.num_blocks(model_cfg)
    sources = grown_block_sources(num_blocks, new_layers // per_block)
    is_copy = np.array([i > 0 and sources[i - 1] == old for i, old in enumerate(sources)])
    axes = parameter_axes(model_cfg)
    flat = {}
    for path, value in flat_leaves(params).items():
        value = np.asarray(value)
        if axes[path][:1] == (LAYERS,):
            value = np.take(value, sources, axis=0)
            if writes_residual(axes[path]):
                value[is_copy] = 0
        flat[path] = value
    new_cfg = resized_config(model_cfg, {}, sources)
    check_shapes(flat, new_cfg)
    return nested(flat), new_cfg, sources


# ----------------------------------------------------------------------------------- width growth

# Widths that can grow with the function kept: new neurons and heads read the residual stream but write
# nothing into it. Not d_model (every RMSNorm's mean over it would change) nor experts (the router would
# send tokens to them).
GROWABLE_AXES = ("heads", "kv_heads", "mlp", "ssm_heads")


def check_growth(model_cfg: ml_collections.ConfigDict, target: Mapping[str, int]) -> dict[str, str]:
    """{growing axis: its config key}; ConfigError naming a flag that cannot grow or does not."""
    widths = layout_of(registry.get_family(model_cfg)).widths
    growable = {key: axis for axis, key in widths.items() if axis in GROWABLE_AXES}
    for key, value in target.items():
        flag = "--" + key.replace("_", "-")
        if key not in growable:
            flags = ", ".join("--" + k.replace("_", "-") for k in growable)
            raise ConfigError(f"{flag} {value}: width growth keeps model.{key}; expected only {flags} "
                              "(depth: --grow-layers)")
        if value < model_cfg[key]:
            raise ConfigError(f"{flag} {value}: expected at least the model's model.{key}={model_cfg[key]}")
    if all(value == model_cfg[key] for key, value in target.items()):
        raise ConfigError(f"target {dict(target)} is the model's own shape; expected a larger width")
    heads = target.get("num_heads", model_cfg.num_heads)
    kv_heads = target.get("num_kv_heads", model_cfg.num_kv_heads)
    group = model_cfg.num_heads // model_cfg.num_kv_heads
    if heads % kv_heads or heads // kv_heads < group:
        raise ConfigError(f"--num-heads {heads} --num-kv-heads {kv_heads}: expected the query heads to split "
                          f"evenly into the KV groups, at least the model's {group} per group")
    return {growable[key]: key for key in target}


def old_positions(axis: str, model_cfg: ml_collections.ConfigDict, new_cfg: ml_collections.ConfigDict):
    """Where the old entries of a growing axis go: first in their axis, or, for query heads, first in
    their KV group (query head h reads KV head h // group before and after)."""
    if axis != "heads":
        key = layout_of(registry.get_family(model_cfg)).widths[axis]
        return np.arange(model_cfg[key])
    group = model_cfg.num_heads // model_cfg.num_kv_heads
    new_group = new_cfg.num_heads // new_cfg.num_kv_heads
    heads = np.arange(model_cfg.num_heads)
    return heads // group * new_group + heads % group


def grow_width(params: Mapping, model_cfg: ml_collections.ConfigDict, target: Mapping[str, int],
               seed: int = 0) -> tuple[dict, ml_collections.ConfigDict]:
    """Width growth with the same logits: the old weights at their old positions, new entries freshly
    initialised (the model's own initialisers, `seed`), except where they would reach the old outputs:
    projections into the residual stream and the layout's `mixes` are zero at the new entries."""
    growing = check_growth(model_cfg, target)
    family = registry.get_family(model_cfg)
    new_cfg = resized_config(model_cfg, target, list(range(family.num_blocks(model_cfg))))
    layout = layout_of(family)
    positions = {axis: old_positions(axis, model_cfg, new_cfg) for axis in growing}
    fresh = flat_leaves(jax.device_get(nnx.to_pure_dict(nnx.state(Decoder(new_cfg, rngs=nnx.Rngs(seed)),
                                                                    nnx.Param))))
    axes = parameter_axes(model_cfg)
    flat = {}
    for path, value in flat_leaves(params).items():
        out = np.array(fresh[path], dtype=np.asarray(value).dtype)
        where = [positions.get(axis, np.arange(size))
                 for axis, size in zip(axes[path], np.shape(value), strict=True)]
        out[np.ix_(*where)] = value
        reads_new = writes_residual(axes[path]) or any(path[-len(s):] == s for s in layout.mixes)
        for dim, axis in enumerate(axes[path]):
            if reads_new and axis in positions:
                new_entries = np.setdiff1d(np.arange(out.shape[dim]), positions[axis])
                out[(slice(None),) * dim + (new_entries,)] = 0
        flat[path] = out
    check_shapes(flat, new_cfg)
    return nested(flat), new_cfg


# ----------------------------------------------------------------------------------- the saved record


def score_key_name(key: ScoreKey) -> str:
    scope, axis = key
    return "/".join((*scope, axis))


def record_arrays(scores: Mapping[ScoreKey, np.ndarray], keep: Mapping[ScoreKey, np.ndarray]) -> dict:
    """The .npz written beside a pruned checkpoint: `score/<scope>/<axis>` and `keep/<scope>/<axis>`."""
    arrays = {f"score/{score_key_name(key)}": np.asarray(value) for key, value in scores.items()}
    arrays.update({f"keep/{score_key_name(key)}": np.asarray(value) for key, value in keep.items()})
    return arrays
