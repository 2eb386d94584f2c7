"""PLaMo 2 export: mlx-lm's independent `plamo2` port loads our checkpoint and computes our logits."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from plamo_jax.configuration import default_config, load_recipe
from plamo_jax.convert import plamo2
from plamo_jax.models.decoder import Decoder
from plamo_jax.models.ssm import inverse_softplus
from plamo_jax.train.checkpoint import load_params, save_params


def tiny_cfg(num_kv_heads: int, tie: bool = True) -> ml_collections.ConfigDict:
    m = default_config().model
    m.family = "hybrid"
    m.vocab_size, m.d_model, m.num_layers, m.mlp_dim = 96, 32, 4, 48
    m.num_heads, m.num_kv_heads, m.head_dim = 4, num_kv_heads, 8
    m.ssm_num_heads, m.ssm_head_dim, m.ssm_state_dim = 4, 8, 8
    m.ssm_conv_width, m.ssm_chunk_size, m.mamba_step = 4, 8, 2
    m.norm_eps = 1e-6
    m.qk_norm = True
    m.tie_embeddings = tie
    m.attention_window = 0  # mlx-lm has no sliding window
    return m


def random_model(cfg, seed: int) -> Decoder:
    """Every parameter random (norm deltas too) so that no mapping can hide behind an identity init."""
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = []
    for (path, leaf), key in zip(leaves, keys, strict=True):
        name = jax.tree_util.keystr(path)
        noise = jax.random.normal(key, leaf.shape)
        if "dt_bias" in name:  # keep dt inside mlx-lm's clip range [1e-3, 100] (we do not clip)
            value = inverse_softplus(jnp.full(leaf.shape, 0.05)) + 0.2 * noise
        elif "A_log" in name:
            value = jnp.log(jax.random.uniform(key, leaf.shape, minval=1.0, maxval=4.0))
        elif "norm" in name or name.endswith("['D']"):
            value = 0.2 * noise + (1.0 if name.endswith("['D']") else 0.0)
        else:
            value = 0.3 * noise
        new.append(value.astype(leaf.dtype))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
    return model


def write_checkpoint(model: Decoder, cfg, directory: pathlib.Path) -> dict[str, np.ndarray]:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = dict(plamo2.export_tensors(params, cfg))
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(plamo2.hf_config(cfg)))
    return tensors


@nnx.jit
def forward(model, tokens):
    segments = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model(tokens, segments, positions)[0]


@pytest.mark.slow
@pytest.mark.parametrize("num_kv_heads,tie", [(1, True), (2, False)])
def test_mlx_lm_loads_export_and_matches_logits(tmp_path, num_kv_heads, tie):
    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    cfg = tiny_cfg(num_kv_heads, tie)
    model = random_model(cfg, seed=num_kv_heads)
    write_checkpoint(model, cfg, tmp_path)
    mlx_model, _ = mlx_utils.load_model(tmp_path)  # strict: every tensor must be consumed
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 19), 0, cfg.vocab_size))
    theirs = np.asarray(mlx_model(mx.array(tokens)).astype(mx.float32))
    ours = np.asarray(forward(model, jnp.asarray(tokens)))
    assert np.abs(ours).max() > 1.0  # a real signal, not near-zero logits
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_export_import_round_trip(tmp_path):
    cfg = tiny_cfg(num_kv_heads=2, tie=False)
    model = random_model(cfg, seed=5)
    tensors = write_checkpoint(model, cfg, tmp_path)
    assert tensors["model.layers.layers.0.mixer.conv1d.weight"].shape == (32, 1, 4)
    assert tensors["model.layers.layers.1.mixer.qkv_proj.weight"].shape == ((4 + 2 * 2) * 8, 32)
    assert tensors["model.layers.layers.0.mlp.gate_up_proj.weight"].shape == (96, 32)
    overrides = plamo2.model_overrides(json.loads((tmp_path / "config.json").read_text()))
    for key, value in overrides.items():
        expected = tuple(cfg[key]) if isinstance(value, tuple) else cfg[key]
        assert expected == value, key
    imported = dict(plamo2.import_params(tensors.__getitem__, cfg))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert sorted(imported) == sorted(flat)
    for path, value in flat.items():
        np.testing.assert_array_equal(imported[path], np.asarray(value), err_msg=path)


def test_in_proj_interleaves_z_and_x_per_head():
    cfg = tiny_cfg(num_kv_heads=1)
    model = random_model(cfg, seed=7)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = dict(plamo2.export_tensors(params, cfg))
    in_proj = tensors["model.layers.layers.2.mixer.in_proj.weight"]  # [2 * H * P, D]
    ours = np.asarray(params["blocks"]["layer_0"]["mixer"]["in_proj"][1])  # group 1, layer 0 = layer 2
    head, p = 2, 8
    np.testing.assert_array_equal(in_proj[head * 2 * p : head * 2 * p + p], ours[:, head, 0].T)  # z_h
    np.testing.assert_array_equal(in_proj[head * 2 * p + p : (head + 1) * 2 * p], ours[:, head, 1].T)  # x_h


def test_model_overrides_reads_published_1b_config_and_rejects_unknown_values():
    published = {
        "architectures": ["Plamo2ForCausalLM"],
        "model_type": "plamo2",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 1,
        "hidden_size_per_head": 128,
        "intermediate_size": 8192,
        "mamba_d_state": 64,
        "mamba_d_conv": 4,
        "mamba_num_heads": 32,
        "mamba_step": 2,
        "mamba_chunk_size": 256,
        "mamba_enabled": True,
        "attention_window_size": 2048,
        "sliding_window": 2048,
        "full_attention_idx": [],
        "max_position_embeddings": 10485760,
        "rms_norm_eps": 1e-6,
        "vocab_size": 100000,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_theta": 10000.0,
        "linear_type": "fp8",
        "fp8_accum_dtype": "bfloat16",
        "n_expert": None,
    }
    overrides = plamo2.model_overrides(published)
    assert overrides["attention_window"] == 2048 and overrides["ssm_num_heads"] == 32
    assert overrides["ssm_head_dim"] == overrides["head_dim"] == 128
    with pytest.raises(ValueError, match="n_expert=8"):
        plamo2.model_overrides(published | {"n_expert": 8})
    with pytest.raises(ValueError, match="mystery_field"):
        plamo2.model_overrides(published | {"mystery_field": 3})
    bad = tiny_cfg(1)
    bad.ssm_head_dim = 16
    with pytest.raises(ValueError, match="ssm_head_dim=16"):
        plamo2.hf_config(bad)


def test_exported_tensors_are_c_contiguous():
    cfg = tiny_cfg(num_kv_heads=2, tie=False)
    params = nnx.to_pure_dict(nnx.state(random_model(cfg, seed=9), nnx.Param))
    for name, value in plamo2.export_tensors(params, cfg):
        assert value.flags["C_CONTIGUOUS"] and value.dtype == np.float32, name


def test_conversion_tool_round_trips_a_plamo2_checkpoint(tmp_path):
    """Orbax -> PLaMo 2 HF -> Orbax through tools/convert_checkpoint.py gives back every parameter."""
    config = load_recipe("plamo2_tiny")
    params = nnx.to_pure_dict(nnx.state(Decoder(config.model, rngs=nnx.Rngs(3))))
    save_params(tmp_path / "ckpt", params, config)
    tool = [
        sys.executable,
        str(pathlib.Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"),
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    for args in (
        ["to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype", "fp32"],
        [
            "from-hf",
            "--hf",
            str(tmp_path / "hf"),
            "--out",
            str(tmp_path / "back"),
            "--config",
            "configs/plamo2_tiny.py",
        ],
    ):
        done = subprocess.run(
            [*tool, *args],
            env=env,
            capture_output=True,
            text=True,
            cwd=pathlib.Path(__file__).resolve().parents[1],
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Plamo2ForCausalLM"]
    restored, restored_config = load_params(tmp_path / "back")
    assert restored_config.model.family == "hybrid"
    jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(params))
