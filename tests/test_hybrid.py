"""Hybrid (PLaMo 2) model: packing, sliding windows, recurrent generation, parallelism, published sizes."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import mesh_of, random_batch, small_config

from plamo_jax.configuration import default_config, mesh_rules
from plamo_jax.models import hybrid
from plamo_jax.models.attention import dot_product_attention
from plamo_jax.models.decoder import Decoder
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import state as state_lib
from plamo_jax.train.objectives.lm import lm_loss_sums

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def tiny_cfg(window=0, full_layers=()):
    m = default_config().model
    m.family = "hybrid"
    m.vocab_size, m.d_model, m.num_layers, m.mlp_dim = 64, 32, 4, 48
    m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 8
    m.ssm_num_heads, m.ssm_head_dim, m.ssm_state_dim = 4, 8, 8
    m.ssm_conv_width, m.ssm_chunk_size, m.mamba_step = 4, 4, 2
    m.norm_eps = 1e-6
    m.init_std = 0.2
    m.attention_window, m.full_attention_layers = window, full_layers
    return m


def perturb_norms(model, seed=1):
    """Random norm deltas so the offsets and the stored weights both matter."""
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    new = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.2 * jax.random.normal(next(keys), v.shape)
        if "norm" in jax.tree_util.keystr(path) else v, state)
    nnx.update(model, new)
    return model


@nnx.jit
def forward(model, tokens, segments, positions):
    return model(tokens, segments, positions)[0]


def test_layer_pattern_matches_plamo2_rule():
    cfg = tiny_cfg()
    cfg.num_layers, cfg.mamba_step = 8, 4
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    kinds = [layer.is_mamba for layer in model.blocks.layers]
    assert kinds == [True, True, False, True]  # i % 4 == 2 is attention
    with pytest.raises(ValueError, match="full_attention_layers"):
        bad = tiny_cfg(window=4, full_layers=(0,))  # layer 0 is Mamba
        Decoder(bad, rngs=nnx.Rngs(0))


def test_packed_documents_equal_separate_runs():
    cfg = tiny_cfg(window=6, full_layers=(3,))
    model = perturb_norms(Decoder(cfg, rngs=nnx.Rngs(0)))
    doc_a, doc_b = (jax.random.randint(k, (n,), 0, cfg.vocab_size)
                    for k, n in zip(jax.random.split(jax.random.key(1)), (13, 8), strict=True))
    filler = jnp.zeros((13,), jnp.int32)
    # one compile: row 0 packs both documents; rows 1 and 2 hold each alone, followed by another segment
    tokens = jnp.stack([jnp.concatenate([doc_a, doc_b]), jnp.concatenate([doc_a, filler[:8]]),
                        jnp.concatenate([doc_b, filler])])
    segments = jnp.asarray([[1] * 13 + [2] * 8, [1] * 13 + [9] * 8, [1] * 8 + [9] * 13])
    positions = jnp.asarray([[*range(13), *range(8)], [*range(13), *range(8)], [*range(8), *range(13)]])
    logits = forward(model, tokens, segments, positions)
    np.testing.assert_allclose(logits[0, :13], logits[1, :13], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, 13:], logits[2, :8], rtol=1e-5, atol=1e-5)


@nnx.jit
def _reference_with_band_masks(model, tokens, masks):
    """Same weights, each attention layer given an explicit band mask (masks[layer index], [L, L])."""
    length = tokens.shape[1]
    graphdef, state = nnx.split(model.blocks)
    x = model.embed_tokens(tokens)
    positions = jnp.arange(length)[None]
    for g in range(model.num_blocks):
        group = nnx.merge(graphdef, jax.tree.map(lambda a, g=g: a[g], state))
        for k, layer in enumerate(group.layers):
            hidden = layer.pre_mixer_norm(x)
            if layer.is_mamba:
                mixed = layer.mixer(hidden, jnp.ones((1, length), jnp.int32))
            else:
                q, key, value = layer.mixer.project_qkv(hidden, positions)
                band = masks[g * len(group.layers) + k]
                mixed = layer.mixer.project_out(dot_product_attention(q, key, value, band[None, None]))
            x = layer.add_mlp(layer.add_mixer(x, mixed))
    return model.logits(x)


def test_sliding_window_equals_explicit_band_mask():
    cfg = tiny_cfg(window=5, full_layers=(3,))
    model = perturb_norms(Decoder(cfg, rngs=nnx.Rngs(2)))
    tokens = jax.random.randint(jax.random.key(3), (1, 16), 0, cfg.vocab_size)
    ones = jnp.ones((1, 16), jnp.int32)
    ours = forward(model, tokens, ones, jnp.arange(16)[None])
    i, j = np.arange(16)[:, None], np.arange(16)[None, :]
    masks = {1: jnp.asarray((j <= i) & (i - j < 5)), 3: jnp.asarray(j <= i)}  # layer 3 is listed as full
    np.testing.assert_allclose(ours, _reference_with_band_masks(model, tokens, masks), rtol=1e-5, atol=1e-5)
    windowed_everywhere = {1: masks[1], 3: masks[1]}
    assert not np.allclose(ours, _reference_with_band_masks(model, tokens, windowed_everywhere), atol=1e-3)


@nnx.jit(static_argnames=("batch", "max_length"))
def _init_cache(model, batch, max_length):
    return hybrid.init_cache(model, batch, max_length)


@nnx.jit
def _extend(model, tokens, start, cache):
    return hybrid.extend(model, tokens, start, cache)


def test_recurrent_generation_equals_full_forward():
    cfg = tiny_cfg(window=5, full_layers=(3,))
    model = perturb_norms(Decoder(cfg, rngs=nnx.Rngs(4)))
    tokens = jax.random.randint(jax.random.key(5), (2, 14), 0, cfg.vocab_size)
    full = forward(model, tokens, jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(14), (2, 14)))
    cache = _init_cache(model, batch=2, max_length=16)
    logits, cache = _extend(model, tokens[:, :6], 0, cache)  # prefill (chunked SSD with padding)
    steps = [logits]
    for t in range(6, 14):  # then one token at a time
        logits, cache = _extend(model, tokens[:, t:t + 1], t, cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)
    # greedy generation picks the full forward's argmax at every new position
    new_tokens = hybrid.greedy_generate(model, tokens[:, :10], max_new_tokens=4)
    sequence = jnp.concatenate([tokens[:, :10], new_tokens], axis=1)
    logits = forward(model, sequence, jnp.ones_like(sequence), jnp.broadcast_to(jnp.arange(14), (2, 14)))
    np.testing.assert_array_equal(jnp.argmax(logits[:, 9:13], -1), new_tokens)


def _hybrid_config():
    return small_config(family="hybrid", ssm_num_heads=4, ssm_head_dim=16, ssm_state_dim=8, ssm_chunk_size=4,
                        mamba_step=2, num_layers=4, attention_window=6, full_attention_layers=(3,),
                        norm_eps=1e-6, init_std=0.1)


def _run_grads(config, mesh, host_params, host_batch):
    """loss and grads with parameters and batch placed by the rules (the trainer's own machinery)."""
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    params = jax.device_put(host_params, setup.param_shardings)
    batch_sharding = state_lib.batch_sharding(mesh, rules)
    batch = jax.device_put(host_batch, batch_sharding)

    def loss_fn(params, batch):
        objective, sums = lm_loss_sums(setup.graphdef, params, batch, config.model, config.train.z_loss)
        return objective / sums["tokens"]

    with sharding_context(mesh, rules):
        grad_fn = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(setup.param_shardings, batch_sharding))
        jaxpr = str(jax.make_jaxpr(jax.value_and_grad(loss_fn))(params, batch))
        loss, grads = grad_fn(params, batch)
    return jax.device_get((loss, grads)), jaxpr, params


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [dict(sequence=4, tensor=2), dict(data=2, sequence=2, tensor=2),
                                   dict(fsdp=2, sequence=4)])
def test_sequence_and_tensor_parallel_equal_single_device(sizes):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    config = _hybrid_config()
    single = mesh_of(data=1)
    setup = state_lib.setup_model(config.model, single, mesh_rules(config))
    host_params = perturb_params(jax.device_get(state_lib.init_params(config.model, setup, seed=0)))
    # documents cross the 4-token sequence shards, so states must pass between shards and reset inside them
    host_batch = random_batch(np.random.default_rng(0), 4, 16, config.model.vocab_size)
    (loss_ref, grads_ref), _, _ = _run_grads(config, single, host_params, host_batch)
    config.mesh.update({"data": 1, **sizes})
    (loss, grads), jaxpr, params = _run_grads(config, mesh_of(**sizes), host_params, host_batch)
    assert "shard_map" in jaxpr  # the conv and the SSD really ran sequence-parallel
    heads_split = params["blocks"]["layer_0"]["mixer"]["in_proj"].sharding
    assert sizes.get("tensor", 1) == 1 or not heads_split.is_fully_replicated  # SSM heads on the tensor axis
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for (path, g), g_ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                jax.tree_util.tree_leaves(grads_ref), strict=True):
        # shards sum in another order: allow fp32 reassociation error relative to the gradient's scale
        scale = float(np.abs(np.asarray(g_ref)).max())
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * scale + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def perturb_params(params, seed=3):
    """Norm deltas away from their init so the sharded norms are exercised with real values."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.2 * rng.standard_normal(v.shape).astype(v.dtype)
        if "norm" in jax.tree_util.keystr(path) else v, params)


def test_remat_and_bfloat16_paths():
    cfg = tiny_cfg(window=5, full_layers=(3,))
    model = perturb_norms(Decoder(cfg, rngs=nnx.Rngs(8)))
    tokens = jax.random.randint(jax.random.key(9), (1, 11), 0, cfg.vocab_size)
    ones, positions = jnp.ones((1, 11), jnp.int32), jnp.arange(11)[None]
    reference = forward(model, tokens, ones, positions)
    scale = float(jnp.abs(reference).max())
    for remat, dtype, tolerance in (("full", "float32", 1e-5), ("save_dots", "bfloat16", 0.05 * scale)):
        other_cfg = tiny_cfg(window=5, full_layers=(3,))
        other_cfg.remat, other_cfg.dtype = remat, dtype
        other = Decoder(other_cfg, rngs=nnx.Rngs(8))
        nnx.update(other, nnx.state(model))
        logits = forward(other, tokens, ones, positions)
        assert logits.dtype == jnp.float32
        np.testing.assert_allclose(logits, reference, rtol=tolerance, atol=tolerance)


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name,expected", [("plamo2_1b", 1_291_441_920), ("plamo2_8b", 9_118_372_864),
                                           ("plamo2_tiny", None)])
def test_published_parameter_counts(name, expected):
    cfg = _load_config(name).model
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    count = sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    if expected is not None:
        assert count == expected
    else:
        assert count < 5_000_000
