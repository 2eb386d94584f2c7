"""Drop-Upcycling: plain upcycling reproduces the dense model, partial re-initialisation is exact."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plamo_jax.configuration import default_config
from plamo_jax.convert.upcycle import drop_neurons, upcycle_params
from plamo_jax.models.decoder import Decoder

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_EXPERTS = 4
WIDTH = 16


def dense_cfg():
    cfg = default_config().model
    cfg.update(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
               mlp_dim=WIDTH, qk_norm=True)
    return cfg


def moe_cfg_from(dense, **changes):
    cfg = dense.copy_and_resolve_references()
    cfg.update(family="moe", num_experts=NUM_EXPERTS, num_experts_per_token=2, expert_mlp_dim=dense.mlp_dim)
    cfg.update(changes)
    return cfg


def pure_params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def logits_of(cfg, params, ids):
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits, aux = nnx.jit(lambda m: m(ids, jnp.ones_like(ids), positions))(model)
    return np.asarray(logits), aux


@pytest.fixture(scope="module")
def dense():
    cfg = dense_cfg()
    return cfg, pure_params(Decoder(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("before", [True, False])
def test_plain_upcycling_reproduces_dense_logits(dense, before):
    cfg, params = dense
    moe_cfg = moe_cfg_from(cfg, router_softmax_before_topk=before, router_renormalize=True)
    moe_params = upcycle_params(params, cfg, moe_cfg, ratio=0.0, seed=0)
    # any router: a large random one makes routing decisive and uneven
    router = moe_params["blocks"]["mlp"]["router"]
    moe_params["blocks"]["mlp"]["router"] = np.random.default_rng(5).normal(0, 3.0, router.shape)
    ids = jax.random.randint(jax.random.key(0), (2, 10), 0, cfg.vocab_size)
    dense_logits, _ = logits_of(cfg, params, ids)
    moe_logits, aux = logits_of(moe_cfg, moe_params, ids)
    # equal up to fp32 rounding of sum_k w_k * y with sum_k w_k = 1 (different summation order)
    np.testing.assert_allclose(moe_logits, dense_logits, atol=3e-6, rtol=1e-5)
    assert float(jnp.max(aux["tokens_per_expert"])) > float(jnp.min(aux["tokens_per_expert"]))


def changed_neurons(expert_DF, dense_DF, axis: int) -> np.ndarray:
    """Indices of neurons (columns of [D, F] when axis=0 reduces rows) that differ from the dense ones."""
    return np.flatnonzero(np.any(expert_DF != dense_DF, axis=axis))


def test_half_of_each_experts_neurons_are_reinitialised(dense):
    cfg, params = dense
    moe_params = upcycle_params(params, cfg, moe_cfg_from(cfg), ratio=0.5, seed=0)
    mlp, dense_mlp = moe_params["blocks"]["mlp"], params["blocks"]["mlp"]
    assert mlp["gate"].shape == (cfg.num_layers, NUM_EXPERTS, cfg.d_model, WIDTH)
    assert mlp["down"].shape == (cfg.num_layers, NUM_EXPERTS, WIDTH, cfg.d_model)
    for layer in range(cfg.num_layers):
        index_sets = []
        for expert in range(NUM_EXPERTS):
            dense_gate, dense_up, dense_down = (np.asarray(dense_mlp[name][layer])
                                                for name in ("gate", "up", "down"))
            gate = changed_neurons(mlp["gate"][layer, expert], dense_gate, axis=0)
            up = changed_neurons(mlp["up"][layer, expert], dense_up, axis=0)
            down = changed_neurons(mlp["down"][layer, expert], dense_down, axis=1)
            assert len(gate) == WIDTH // 2
            np.testing.assert_array_equal(gate, up)  # whole neurons: one set for gate, up and down
            np.testing.assert_array_equal(gate, down)
            # the kept neurons are bit-identical copies, every weight of a dropped neuron is new
            kept = np.setdiff1d(np.arange(WIDTH), gate)
            np.testing.assert_array_equal(mlp["gate"][layer, expert][:, kept], dense_gate[:, kept])
            assert np.all(mlp["gate"][layer, expert][:, gate] != dense_gate[:, gate])
            index_sets.append(tuple(gate))
        assert len(set(index_sets)) == NUM_EXPERTS  # experts differ from each other
        assert not np.array_equal(mlp["gate"][layer, 0], mlp["gate"][layer, 1])

    # everything outside the MLP is copied; the router is new with std 0.02
    for name in ("attn", "attn_norm", "mlp_norm"):
        jax.tree.map(np.testing.assert_array_equal, moe_params["blocks"][name], params["blocks"][name])
    np.testing.assert_array_equal(moe_params["embed"], params["embed"])
    np.testing.assert_array_equal(moe_params["final_norm"]["scale"], params["final_norm"]["scale"])
    assert mlp["router"].shape == (cfg.num_layers, cfg.d_model, NUM_EXPERTS)
    assert abs(float(np.std(mlp["router"])) - 0.02) < 0.004


def test_per_matrix_variant_and_seeds(dense):
    cfg, params = dense
    moe_cfg = moe_cfg_from(cfg)
    split = upcycle_params(params, cfg, moe_cfg, ratio=0.25, seed=3, whole_neurons=False)
    mlp, dense_mlp = split["blocks"]["mlp"], params["blocks"]["mlp"]
    dense_gate, dense_up = np.asarray(dense_mlp["gate"][0]), np.asarray(dense_mlp["up"][0])
    sets = [changed_neurons(mlp["gate"][0, e], dense_gate, 0) for e in range(NUM_EXPERTS)]
    ups = [changed_neurons(mlp["up"][0, e], dense_up, 0) for e in range(NUM_EXPERTS)]
    assert all(len(s) == WIDTH // 4 for s in sets + ups)
    assert any(not np.array_equal(g, u) for g, u in zip(sets, ups, strict=True))  # independent draws

    again = upcycle_params(params, cfg, moe_cfg, ratio=0.25, seed=3, whole_neurons=False)
    other = upcycle_params(params, cfg, moe_cfg, ratio=0.25, seed=4, whole_neurons=False)
    np.testing.assert_array_equal(again["blocks"]["mlp"]["gate"], mlp["gate"])
    assert not np.array_equal(other["blocks"]["mlp"]["gate"], mlp["gate"])


def test_reinitialised_values_follow_the_replaced_slice_statistics():
    rng = np.random.default_rng(0)
    weight = rng.normal(0.0, 1.0, size=(256, 400)).astype(np.float32)
    indices = np.arange(0, 400, 2)
    weight[:, indices] = rng.normal(0.7, 2.5, size=(256, len(indices)))  # the slice has its own mean / std
    out = drop_neurons(weight, 1, indices, np.random.default_rng(1))
    new = out[:, indices]
    assert abs(new.mean() - 0.7) < 0.05 and abs(new.std() - 2.5) < 0.05
    np.testing.assert_array_equal(out[:, 1::2], weight[:, 1::2])


def test_incompatible_configs_are_rejected(dense):
    cfg, params = dense
    with pytest.raises(ValueError, match="expert_mlp_dim"):
        upcycle_params(params, cfg, moe_cfg_from(cfg, expert_mlp_dim=8), ratio=0.5, seed=0)
    with pytest.raises(ValueError, match="model.d_model"):
        upcycle_params(params, cfg, moe_cfg_from(cfg, d_model=32), ratio=0.5, seed=0)
    with pytest.raises(ValueError, match="ratio=1.5"):
        upcycle_params(params, cfg, moe_cfg_from(cfg), ratio=1.5, seed=0)


def load_tool():
    spec = importlib.util.spec_from_file_location("tools_upcycle", REPO / "tools" / "upcycle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_writes_a_loadable_moe_checkpoint(dense, tmp_path):
    from plamo_jax.train import checkpoint

    cfg, params = dense
    run_config = default_config()
    run_config.model = cfg
    checkpoint.save_params(tmp_path / "dense", jax.tree.map(np.asarray, params), run_config)
    tool = load_tool()
    assert tool.main(["--ratio", "0", "--experts", "4", "--top-k", "2", "--seed", "0",
                      str(tmp_path / "dense"), str(tmp_path / "moe")]) == 0
    moe_params, moe_config = checkpoint.load_params(tmp_path / "moe")
    assert moe_config.model.family == "moe" and moe_config.model.num_experts == 4
    ids = jax.random.randint(jax.random.key(1), (1, 6), 0, cfg.vocab_size)
    moe_model_cfg = default_config().model
    moe_model_cfg.update(moe_config.model.to_dict())
    moe_logits, _ = logits_of(moe_model_cfg, moe_params, ids)
    dense_logits, _ = logits_of(cfg, params, ids)
    np.testing.assert_allclose(moe_logits, dense_logits, atol=3e-6, rtol=1e-5)
