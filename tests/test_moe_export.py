"""MoE export to Hugging Face Mixtral / Qwen3-MoE: logits parity with transformers, and import round trip."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import mesh_of

from plamo_jax.configuration import default_config
from plamo_jax.convert import hf, mixtral, qwen3_moe
from plamo_jax.models.decoder import Decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

LENGTH = 12


def tiny_moe_cfg(qk_norm: bool, tie: bool, softmax_before_topk: bool = True, renormalize: bool = True):
    cfg = default_config().model
    cfg.update(family="moe", vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=16, num_experts=4, num_experts_per_token=2, expert_mlp_dim=24, qk_norm=qk_norm,
               tie_embeddings=tie, rope_theta=5000.0, norm_eps=1e-6,
               router_softmax_before_topk=softmax_before_topk, router_renormalize=renormalize)
    return cfg


def random_params(cfg) -> dict:
    """Decoder parameters with every tensor random (norm scales near 1, a decisive router), so a wrong
    mapping of any tensor changes the logits."""
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(1)

    def randomize(path, value):
        names = [getattr(entry, "key", "") for entry in path]
        noise = rng.normal(size=value.shape).astype(np.float32)
        if "scale" in names:
            return 1.0 + 0.1 * noise
        return (0.6 if "router" in names else 0.2) * noise

    return jax.tree_util.tree_map_with_path(randomize, params)


def our_logits(cfg, params, ids: np.ndarray) -> np.ndarray:
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    nnx.replace_by_pure_dict(state := nnx.state(model, nnx.Param), jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    batch, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    logits, _ = model(jnp.asarray(ids), jnp.ones((batch, length), jnp.int32), positions)
    return np.asarray(logits)


def write_hf(tmp_path, module, cfg, params) -> None:
    tensors = {name: np.ascontiguousarray(value) for name, value in module.export_tensors(params, cfg)}
    safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(module.hf_config(cfg)))


def check_overrides(module, hf_cfg: dict, cfg) -> None:
    """model_overrides of a config.json gives back every model field it sets."""
    overrides = module.model_overrides(hf_cfg)
    for key, value in overrides.items():
        if key == "router_softmax_before_topk":  # softmax after top-k is exported as before + renormalise
            continue
        assert value == cfg[key], (key, value, cfg[key])


def flatten(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = np.asarray(value)
    return flat


CASES = [
    pytest.param(mixtral, False, False, True, True, id="mixtral-untied"),
    pytest.param(mixtral, False, True, False, True, id="mixtral-tied-softmax-after-topk"),
    pytest.param(qwen3_moe, True, False, True, False, id="qwen3moe-no-renorm"),
    pytest.param(qwen3_moe, True, True, True, True, id="qwen3moe-tied-renorm"),
]


@pytest.mark.parametrize("module, qk_norm, tie, before, renorm", CASES)
def test_hf_logits_parity(tmp_path, module, qk_norm, tie, before, renorm):
    cfg = tiny_moe_cfg(qk_norm, tie, before, renorm)
    params = random_params(cfg)
    if tie:  # through the conversion driver (sharded writer, config.json, generation_config.json)
        hf.export_hf(params, cfg, tmp_path, fmt=module.__name__.rsplit(".", 1)[1], dtype="float32")
    else:
        write_hf(tmp_path, module, cfg, params)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert type(hf_model).__name__ == module.ARCHITECTURE
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, LENGTH))
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(our_logits(cfg, params, ids), expected, atol=1e-4, rtol=1e-4)

    # the config.json transformers itself writes for this model maps back to our config
    hf_model.config.save_pretrained(str(tmp_path / "resaved"))
    check_overrides(module, json.loads((tmp_path / "resaved" / "config.json").read_text()), cfg)


@pytest.mark.parametrize("module, qk_norm, tie, before, renorm", CASES[::2])
def test_import_round_trip_and_overrides(tmp_path, module, qk_norm, tie, before, renorm):
    cfg = tiny_moe_cfg(qk_norm, tie, before, renorm)
    params = random_params(cfg)
    tensors = dict(module.export_tensors(params, cfg))
    imported = dict(module.import_params(lambda name: tensors[name], cfg))
    original = flatten(params)
    assert sorted(imported) == sorted(original)
    for path, value in original.items():
        np.testing.assert_array_equal(imported[path], value, err_msg=path)

    hf_config = module.hf_config(cfg)
    assert hf_config["num_local_experts"] == hf_config["num_experts"] == cfg.num_experts
    assert hf_config["rope_theta"] == hf_config["rope_parameters"]["rope_theta"] == cfg.rope_theta
    check_overrides(module, json.loads(json.dumps(hf_config)), cfg)


def test_overrides_reject_unmappable_fields():
    cfg = tiny_moe_cfg(qk_norm=False, tie=False)
    config = mixtral.hf_config(cfg)
    with pytest.raises(ValueError, match="sliding_window"):
        mixtral.model_overrides({**config, "sliding_window": 4096})
    with pytest.raises(ValueError, match="hidden_act"):
        mixtral.model_overrides({**config, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="shared_expert_intermediate_size"):
        mixtral.model_overrides({**config, "shared_expert_intermediate_size": 64})
    with pytest.raises(ValueError, match="disagree"):
        mixtral.model_overrides({**config, "num_experts": 7})
    qwen_config = qwen3_moe.hf_config(tiny_moe_cfg(qk_norm=True, tie=False))
    with pytest.raises(ValueError, match="mlp_only_layers"):
        qwen3_moe.model_overrides({**qwen_config, "mlp_only_layers": [0]})
    with pytest.raises(ValueError, match="qk_norm"):
        mixtral.hf_config(tiny_moe_cfg(qk_norm=True, tie=False))
    with pytest.raises(ValueError, match="renormalise"):
        mixtral.hf_config(tiny_moe_cfg(qk_norm=False, tie=False, softmax_before_topk=True, renormalize=False))


@pytest.mark.parametrize("fmt, qk_norm", [("mixtral", False), ("qwen3_moe", True)])
def test_driver_round_trip(tmp_path, fmt, qk_norm):
    """hf.export_hf then hf.import_hf (the conversion driver) gives back the parameters and config."""
    cfg = tiny_moe_cfg(qk_norm, tie=False, softmax_before_topk=True, renormalize=not qk_norm)
    params = random_params(cfg)
    hf.export_hf(params, cfg, tmp_path / "hf", fmt=fmt, dtype="float32")
    mesh = mesh_of(data=1)
    imported, config = hf.import_hf(tmp_path / "hf", default_config(), list(mesh.devices.flat))
    for key in ("family", "num_experts", "num_experts_per_token", "expert_mlp_dim", "router_renormalize",
                "qk_norm", "tie_embeddings", "rope_theta"):
        assert config.model[key] == cfg[key], key
    imported, original = flatten(imported), flatten(params)
    assert sorted(imported) == sorted(original)
    for path, value in original.items():
        np.testing.assert_array_equal(imported[path], value, err_msg=path)
