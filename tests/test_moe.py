"""Mixture of experts: routing, dropless and capacity dispatch, aux losses, expert parallelism, configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import mesh_of

from plamo_jax.configuration import default_config, load_recipe
from plamo_jax.errors import ConfigError
from plamo_jax.models import experts, kernels, moe, registry
from plamo_jax.models.decoder import Decoder
from plamo_jax.parallel import rules


def apply(layer, x_BLD):
    """One compiled call (eager op-by-op dispatch is slow on a shared CPU)."""
    return nnx.jit(lambda module, x: module(x))(layer, x_BLD)


def moe_cfg(**changes):
    cfg = default_config().model
    cfg.update(family="moe", vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
               head_dim=8, num_experts=8, num_experts_per_token=2, expert_mlp_dim=12)
    cfg.update(changes)
    return cfg


def naive_moe(x_TD, router_DE, gate_EDF, up_EDF, down_EFD, k, softmax_before_topk, renormalize):
    """Per-token loop in float64 over the chosen experts."""
    x, router = np.asarray(x_TD, np.float64), np.asarray(router_DE, np.float64)
    gate, up, down = (np.asarray(w, np.float64) for w in (gate_EDF, up_EDF, down_EFD))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ router
        chosen = np.argsort(-logits, kind="stable")[:k]
        if softmax_before_topk:
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            weights = probs[chosen] / (probs[chosen].sum() if renormalize else 1.0)
        else:
            weights = np.exp(logits[chosen] - logits[chosen].max())
            weights /= weights.sum()
        for weight, e in zip(weights, chosen, strict=True):
            g, u = x[t] @ gate[e], x[t] @ up[e]
            out[t] += weight * ((g / (1 + np.exp(-g)) * u) @ down[e])
    return out


def assert_trees_close(got, expected):
    """Leaf by leaf (named by its path on failure), at the tolerance of a sharded MoE step."""
    flat_expected = jax.tree_util.tree_leaves_with_path(expected)
    flat_got = jax.tree_util.tree_leaves(got)
    assert len(flat_expected) == len(flat_got)
    for (path, want), have in zip(flat_expected, flat_got, strict=True):
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), atol=2e-6, rtol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("before, renorm", [(True, True), (True, False), (False, False)])
def test_dropless_dispatch_matches_per_token_loop(before, renorm):
    cfg = moe_cfg(router_softmax_before_topk=before, router_renormalize=renorm, num_experts_per_token=3)
    layer = moe.MoEMLP(cfg, rngs=nnx.Rngs(3))
    layer.router[...] = layer.router[...] * 50  # spread the logits so routing is decisive
    x_BLD = jax.random.normal(jax.random.key(0), (3, 7, cfg.d_model))
    out, aux = apply(layer, x_BLD)
    expected = naive_moe(x_BLD.reshape(-1, cfg.d_model), layer.router[...], layer.gate[...], layer.up[...],
                         layer.down[...], 3, before, renorm)
    np.testing.assert_allclose(np.asarray(out).reshape(-1, cfg.d_model), expected, atol=2e-6, rtol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0
    assert float(jnp.sum(aux["tokens_per_expert"])) == 3 * 7 * 3


def test_blocked_grouped_matmul_equals_ragged_dot():
    """The CPU grouped SwiGLU (padded blocks) == jax.lax.ragged_dot's, values and gradients; groups of
    size 0, one large group and unused trailing rows included."""
    rows, d_model, width = 37, 6, 5
    group_sizes = jnp.array([0, 20, 3, 0, 9], jnp.int32)  # 32 of 37 rows used
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (rows, d_model))
    gate, up = (jax.random.normal(k, (5, d_model, width)) for k in keys[1:3])
    down = jax.random.normal(keys[3], (5, width, d_model))

    probe = jax.random.normal(jax.random.key(1), (rows, d_model))

    def loss(fn, *args):
        out = fn(args[0], group_sizes, *args[1:])
        return jnp.sum(out * probe), out

    argnums = (0, 1, 2, 3)
    (_, want), want_grads = jax.value_and_grad(lambda *a: loss(experts.ragged_swiglu, *a), argnums,
                                               has_aux=True)(x, gate, up, down)
    (_, have), have_grads = jax.jit(jax.value_and_grad(lambda *a: loss(experts.blocked_swiglu, *a), argnums,
                                                       has_aux=True))(x, gate, up, down)
    np.testing.assert_allclose(np.asarray(have), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(have[32:]), 0.0)
    for have_grad, want_grad in zip(have_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(have_grad), np.asarray(want_grad), atol=1e-4, rtol=1e-5)


def test_shared_experts_add_a_dense_swiglu():
    cfg = moe_cfg(num_shared_experts=2)
    layer = moe.MoEMLP(cfg, rngs=nnx.Rngs(1))
    assert layer.shared.gate.shape == (cfg.d_model, 2 * cfg.expert_mlp_dim)
    x_BLD = jax.random.normal(jax.random.key(0), (2, 5, cfg.d_model))
    out, _ = apply(layer, x_BLD)
    routed = naive_moe(x_BLD.reshape(-1, cfg.d_model), layer.router[...], layer.gate[...], layer.up[...],
                       layer.down[...], 2, True, True)
    shared = np.asarray(layer.shared(x_BLD)).reshape(-1, cfg.d_model)
    np.testing.assert_allclose(np.asarray(out).reshape(-1, cfg.d_model), routed + shared, atol=2e-6)


def hand_made_layer(logits_TE: np.ndarray, k: int, capacity_factor: float = 0.0):
    """An MoEMLP whose router logits for input x = identity rows are exactly `logits_TE`."""
    tokens, experts = logits_TE.shape
    cfg = moe_cfg(d_model=tokens, num_experts=experts, num_experts_per_token=k,
                  capacity_factor=capacity_factor)
    layer = moe.MoEMLP(cfg, rngs=nnx.Rngs(0))
    layer.router[...] = jnp.asarray(logits_TE, jnp.float32)
    return layer, jnp.eye(tokens)[None]


def test_aux_losses_match_closed_form():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    layer, x = hand_made_layer(np.log(probs), k=1)
    _, aux = apply(layer, x)
    # top-1 choices 0, 0, 1, 0: f = (3/4, 1/4); mean probabilities P = (0.65, 0.35)
    np.testing.assert_allclose(float(aux["load_balance_loss"]), 2 * (0.75 * 0.65 + 0.25 * 0.35), rtol=1e-6)
    # log-probabilities: logsumexp of each row is log(1) = 0
    np.testing.assert_allclose(float(aux["router_z_loss"]), 0.0, atol=1e-10)
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), [3, 1])

    logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    layer, x = hand_made_layer(logits, k=2)
    _, aux = apply(layer, x)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(aux["router_z_loss"]), np.mean(lse**2), rtol=1e-6)
    probs = np.exp(logits - lse[:, None])
    # top-2 of each row: {1, 0} and {2, 0}: assignments per expert (2, 1, 1) of 4
    expected = 3 * np.sum(np.array([2, 1, 1]) / 4 * probs.mean(0))
    np.testing.assert_allclose(float(aux["load_balance_loss"]), expected, rtol=1e-6)


def test_capacity_keep_mask_gives_first_choices_priority():
    experts_TK = jnp.array([[0, 1], [1, 0], [0, 1]])
    keep = moe.capacity_keep_mask(experts_TK, num_experts=2, capacity=2)
    np.testing.assert_array_equal(np.asarray(keep), [[True, True], [True, False], [True, False]])


def test_capacity_mode_drops_and_reports():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    # capacity = ceil(1.0 * 4 tokens * 1 / 2 experts) = 2: the third token for expert 0 (token 3) drops
    layer, x = hand_made_layer(np.log(probs), k=1, capacity_factor=1.0)
    out, aux = apply(layer, x)
    np.testing.assert_allclose(float(aux["dropped_fraction"]), 0.25)
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), [2, 1])
    dropless, _ = apply(moe.MoEMLP(moe_cfg(d_model=4, num_experts=2, num_experts_per_token=1),
                                  rngs=nnx.Rngs(0)), x)
    np.testing.assert_array_equal(np.asarray(out[0, 3]), 0.0)
    np.testing.assert_allclose(np.asarray(out[0, :3]), np.asarray(dropless[0, :3]), rtol=1e-6)


def test_bad_config_names_the_key():
    one_device = {axis: 1 for axis in rules.MESH_AXES}
    with pytest.raises(ConfigError, match="model.num_experts_per_token=9"):
        registry.validate_model(moe_cfg(num_experts_per_token=9), one_device)
    with pytest.raises(ConfigError, match="model.expert_mlp_dim=0"):
        registry.validate_model(moe_cfg(expert_mlp_dim=0), one_device)
    registry.validate_model(moe_cfg(mlp_dim=0), one_device)  # an MoE has no dense MLP: mlp_dim is unused


# ------------------------------------------------------------------------------ expert parallelism


def loss_and_grads(model, ids):
    segments = jnp.ones_like(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    def loss_fn(model):
        logits, aux = model(ids, segments, positions)
        loss = jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + 0.1 * jnp.sum(aux["load_balance_loss"])
        return loss + 0.01 * jnp.sum(aux["router_z_loss"]), (logits, aux)

    (loss, (logits, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, logits, aux, nnx.state(grads)


MESHES = {
    "expert4_data2": dict(expert=4, data=2),
    "expert2_tensor2_fsdp2": dict(expert=2, tensor=2, fsdp=2),
    "expert4_sequence2": dict(expert=4, sequence=2),
}


@pytest.mark.parametrize("mesh_name, capacity_factor", [
    pytest.param("expert4_data2", 0.0, marks=pytest.mark.slow),
    pytest.param("expert2_tensor2_fsdp2", 0.0, marks=pytest.mark.slow),
    pytest.param("expert4_sequence2", 1.25, marks=pytest.mark.slow),
])
def test_expert_parallel_matches_single_device(mesh_name, capacity_factor):
    """Forward (logits, aux) and gradients of every parameter on 8 devices == one device."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = moe_cfg(capacity_factor=capacity_factor, qk_norm=True, num_layers=1)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (8, 8), 0, cfg.vocab_size)
    expected = nnx.jit(loss_and_grads)(model, ids)
    if capacity_factor:
        assert 0 < float(jnp.mean(expected[2]["dropped_fraction"])) < 0.5

    mesh = mesh_of(**MESHES[mesh_name])
    with rules.sharding_context(mesh, rules.DEFAULT_RULES):
        assert "all_to_all" in str(jax.make_jaxpr(lambda m: loss_and_grads(m, ids))(model))
        got = nnx.jit(loss_and_grads)(model, ids)
    assert_trees_close(got, expected)


def test_expert_parallel_layer_forward_and_grad():
    """One MoE layer on expert=4 x data=2 (dropless) == one device: output, aux, and the gradients of
    the router, the experts and the input. (Whole decoders on more layouts: the slow test above.)"""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = moe_cfg()
    layer = moe.MoEMLP(cfg, rngs=nnx.Rngs(4))
    x_BLD = jax.random.normal(jax.random.key(0), (8, 4, cfg.d_model))
    probe = jax.random.normal(jax.random.key(1), x_BLD.shape)

    def loss_fn(layer, x):
        out, aux = layer(x)
        return jnp.sum(out * probe) + aux["load_balance_loss"] + aux["router_z_loss"], (out, aux)

    step = nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    expected = step(layer, x_BLD)
    mesh = mesh_of(**MESHES["expert4_data2"])
    with rules.sharding_context(mesh, rules.DEFAULT_RULES):
        assert "all_to_all" in str(jax.make_jaxpr(lambda x: layer(x))(x_BLD))
        got = step(layer, x_BLD)
    assert_trees_close(got, expected)


def test_local_path_under_mesh_without_expert_axis():
    """expert axis of size 1: every shard runs its own dropless groups, no all-to-all."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = moe_cfg()
    layer = moe.MoEMLP(cfg, rngs=nnx.Rngs(2))
    x_BLD = jax.random.normal(jax.random.key(0), (4, 6, cfg.d_model))
    expected, _ = apply(layer, x_BLD)
    mesh = mesh_of(data=4, tensor=2)
    with rules.sharding_context(mesh, rules.DEFAULT_RULES):
        got, _ = nnx.jit(lambda m, x: m(x))(layer, x_BLD)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-6, rtol=1e-5)


# -------------------------------------------------------------------------------------------- configs


def parameter_counts(model_cfg) -> tuple[int, int]:
    model = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params))
    experts = params["blocks"]["mlp"]
    per_expert = sum(experts[name].size for name in ("gate", "up", "down")) // model_cfg.num_experts
    inactive = per_expert * (model_cfg.num_experts - model_cfg.num_experts_per_token)
    return total, total - inactive


def test_mixtral_8x7b_parameter_count():
    total, active = parameter_counts(load_recipe("mixtral_8x7b").model)
    assert round(total / 1e9, 1) == 46.7
    assert round(active / 1e9, 1) == 12.9


def test_drop_upcycle_and_tiny_recipes_build():
    total, active = parameter_counts(load_recipe("drop_upcycle_8x").model)
    assert round(active / 1e9, 1) == 5.9  # the paper's "5.9B active" 8x3.7B model
    assert round(total / 1e9, 1) == 18.6
    cfg = load_recipe("moe_tiny").model
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = jnp.zeros((1, 8), jnp.int32)
    logits, aux = nnx.jit(lambda m: m(ids, jnp.ones_like(ids), jnp.arange(8)[None]))(model)
    assert logits.shape == (1, 8, cfg.vocab_size)
    assert aux["tokens_per_expert"].shape == (cfg.num_layers, cfg.num_experts)


def test_experts_sharded_but_tokens_not_is_an_error():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = moe_cfg()
    layer = moe.MoEMLP(cfg, rngs=nnx.Rngs(0))
    mesh = mesh_of(data=2, expert=4)
    table = rules.merge_rules({"act_batch": "data"})
    with rules.sharding_context(mesh, table), pytest.raises(ValueError, match="mesh.rules.act_batch"):
        jax.eval_shape(lambda x: layer(x), jnp.zeros((4, 2, cfg.d_model)))


def test_megablox_grouped_matmuls_equal_the_blocked_kernel_in_values_and_gradients():
    """The TPU path (megablox gmm / tgmm, Pallas interpret mode here) against the CPU path: groups of
    uneven sizes, an empty group, rows past the groups (unused), widths that are and are not 128-multiples."""
    rng = np.random.default_rng(0)
    experts_, d_model, width, rows = 4, 128, 96, 300
    x = jnp.asarray(rng.standard_normal((rows, d_model)), jnp.float32)
    gate, up = (jnp.asarray(rng.standard_normal((experts_, d_model, width)) * 0.1, jnp.float32) for _ in "gu")
    down = jnp.asarray(rng.standard_normal((experts_, width, d_model)) * 0.1, jnp.float32)
    group_sizes = jnp.asarray([70, 0, 130, 60], jnp.int32)  # 260 of 300 rows
    used = (jnp.arange(rows) < 260)[:, None]
    weights = jnp.asarray(rng.standard_normal((rows, d_model)), jnp.float32)

    def loss(kernel):
        return lambda x, g, u, d: jnp.sum(jnp.where(used, kernel(x, group_sizes, g, u, d), 0) * weights)

    with kernels.pallas_interpret():
        got = jax.value_and_grad(loss(experts.megablox_swiglu), argnums=(0, 1, 2, 3))(x, gate, up, down)
    want = jax.value_and_grad(loss(experts.blocked_swiglu), argnums=(0, 1, 2, 3))(x, gate, up, down)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for name, ours, theirs in zip(("dx", "dgate", "dup", "ddown"), got[1], want[1], strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=name)
    with kernels.kernels_for("tpu"), kernels.pallas_interpret():  # TPU tracing picks it; unused rows are 0
        np.testing.assert_allclose(experts.grouped_swiglu(x, group_sizes, gate, up, down),
                                   experts.blocked_swiglu(x, group_sizes, gate, up, down), atol=1e-5)
