"""Hugging Face conversion of the dense model (Llama, Qwen3) checked against transformers in PyTorch."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from plamo_jax.configuration import default_config  # noqa: E402
from plamo_jax.convert import hf, safetensors_io  # noqa: E402
from plamo_jax.errors import ConfigError, ConversionError  # noqa: E402
from plamo_jax.train import checkpoint as ckpt  # noqa: E402
from plamo_jax.train import state as state_lib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=96, rms_norm_eps=1e-5)


def hf_reference_model(kind: str, out_dir: Path, *, vocab_size: int = 96, tie: bool = False,
                       rope_theta: float = 5000.0, seed: int = 0):
    """A random transformers model saved with save_pretrained; norm weights perturbed away from 1."""
    torch.manual_seed(seed)
    config_class = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[kind]
    config = config_class(vocab_size=vocab_size, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                          rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **SHAPES)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.copy_(1.0 + 0.3 * torch.randn_like(weight))
            else:
                weight.normal_(0.0, 0.15)  # larger than the init so logits differ clearly between tokens
    model.save_pretrained(out_dir)
    return model


def load_ours(checkpoint: Path, mesh_cfg=None):
    """(forward(input_ids) -> fp32 logits numpy, config) with params placed on a mesh."""
    from plamo_jax.configuration import mesh_rules
    from plamo_jax.parallel.mesh import make_mesh

    config = ckpt.load_config(checkpoint)
    if mesh_cfg is not None:
        config.mesh.update(mesh_cfg)
    mesh = make_mesh(config.mesh)
    setup = state_lib.setup_model(config.model, mesh, mesh_rules(config))
    params, _ = ckpt.load_params(checkpoint, shardings=setup.param_shardings)

    @jax.jit
    def forward(input_ids):
        positions = jnp_arange_like(input_ids)
        segment_ids = np.ones(input_ids.shape, np.int32)
        logits, _ = nnx.merge(setup.graphdef, params)(input_ids, segment_ids, positions)
        return logits

    return (lambda ids: np.asarray(forward(np.asarray(ids, np.int32)))), config


def jnp_arange_like(input_ids):
    import jax.numpy as jnp

    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def greedy_ours(forward, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding by recomputing the full forward each step over a fixed-length (causal) buffer."""
    batch, prompt_len = prompt.shape
    buffer = np.zeros((batch, prompt_len + new_tokens), np.int32)
    buffer[:, :prompt_len] = prompt
    for position in range(prompt_len, prompt_len + new_tokens):
        logits = forward(buffer)
        buffer[:, position] = logits[:, position - 1].argmax(-1)
    return buffer[:, prompt_len:]


def greedy_torch(model, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    # No EOS: generation must neither stop early nor suppress the EOS logit (as min_new_tokens would).
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                           bos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None  # generate() would otherwise fill it back in
    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompt, dtype=torch.long), generation_config=config)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return out[:, prompt.shape[1]:].numpy()


def read_all(hf_dir: Path) -> dict[str, np.ndarray]:
    reader = safetensors_io.SafetensorsReader(hf_dir)
    return {name: reader.read(name) for name in reader.names()}


@pytest.fixture(scope="module", params=[("llama", False), ("qwen3", True)], ids=["llama", "qwen3_tied"])
def imported(request, tmp_path_factory):
    kind, tie = request.param
    root = tmp_path_factory.mktemp(kind)
    model = hf_reference_model(kind, root / "hf", tie=tie)
    config = default_config()
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    hf.hf_to_checkpoint(root / "hf", root / "ckpt", config)
    return kind, tie, root, model


def test_import_logits_match_transformers(imported):
    kind, tie, root, model = imported
    forward, config = load_ours(root / "ckpt")
    assert config.model.qk_norm == (kind == "qwen3") and config.model.tie_embeddings == tie
    assert config.model.rope_theta == 5000.0 and config.model.norm_eps == 1e-5
    ids = np.random.default_rng(0).integers(0, 96, size=(2, 24))
    ours, theirs = forward(ids), torch_logits(model, ids)
    assert theirs.std() > 0.5  # the comparison is not between near-constant logits
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(imported):
    _, _, root, model = imported
    forward, _ = load_ours(root / "ckpt", mesh_cfg=dict(data=-1, fsdp=1, tensor=1))
    prompt = np.random.default_rng(1).integers(3, 96, size=(2, 5))
    ours, theirs = greedy_ours(forward, prompt, 20), greedy_torch(model, prompt, 20)
    assert len(set(theirs.ravel().tolist())) > 2  # generation is not a single repeated token
    np.testing.assert_array_equal(ours, theirs)


def test_hf_round_trip_is_bit_identical(imported, tmp_path):
    kind, tie, root, _ = imported
    hf.checkpoint_to_hf(root / "ckpt", tmp_path / "out", dtype="fp32")
    source, exported = read_all(root / "hf"), read_all(tmp_path / "out")
    assert sorted(source) == sorted(exported)
    assert ("lm_head.weight" in exported) == (not tie)
    for name, value in source.items():
        assert exported[name].dtype == value.dtype and exported[name].shape == value.shape, name
        assert exported[name].tobytes() == value.tobytes(), name
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((root / "hf" / "config.json").read_text())
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 5000.0
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "architectures", "rope_parameters"):
        assert written[key] == original[key], key
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == original["eos_token_id"]


def random_checkpoint(tmp_path: Path, *, qk_norm: bool, tie: bool, vocab_size: int) -> Path:
    config = default_config()
    m = config.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = (
        vocab_size, 64, 3, 4, 2, 16, 96)
    m.qk_norm, m.tie_embeddings, m.rope_theta, m.norm_eps, m.init_std = qk_norm, tie, 20000.0, 1e-6, 0.15
    params = nnx.to_pure_dict(nnx.state(__import__("plamo_jax.models.decoder", fromlist=["Decoder"])
                                        .Decoder(m, rngs=nnx.Rngs(3))))
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x) + (0.3 * rng.standard_normal(x.shape).astype(np.float32)
                                         if "norm" in jax.tree_util.keystr(path) else 0.0), params)
    ckpt.save_params(tmp_path / "ckpt", params, config)
    return tmp_path / "ckpt"


@pytest.mark.parametrize("qk_norm,tie", [(False, True), (True, False)], ids=["llama_tied", "qwen3"])
def test_export_runs_in_transformers(tmp_path, qk_norm, tie):
    """Ours -> HF (sharded files, vocabulary padded past the tokenizer's) -> transformers: same logits."""
    checkpoint = random_checkpoint(tmp_path, qk_norm=qk_norm, tie=tie, vocab_size=128)
    tokenizer_dir = tmp_path / "tok"
    make_word_tokenizer(tokenizer_dir, num_tokens=100)
    hf.checkpoint_to_hf(checkpoint, tmp_path / "out", dtype="fp32", tokenizer=tokenizer_dir,
                        max_shard_bytes=64 * 1024)
    out = tmp_path / "out"
    assert (out / safetensors_io.SAFETENSORS_INDEX).is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    written = json.loads((out / "config.json").read_text())
    assert written["vocab_size"] == 128 and written["architectures"] == [
        "Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    forward, _ = load_ours(checkpoint)
    ids = np.random.default_rng(2).integers(0, 128, size=(2, 16))
    theirs = torch_logits(model, ids)
    assert theirs.std() > 0.5
    np.testing.assert_allclose(forward(ids), theirs, atol=1e-4, rtol=0)
    prompt = ids[:, :4]
    np.testing.assert_array_equal(greedy_ours(forward, prompt, 20), greedy_torch(model, prompt, 20))

    # bf16 export rounds each tensor the way torch does.
    hf.checkpoint_to_hf(checkpoint, tmp_path / "bf16", dtype="bf16")
    fp32, bf16 = read_all(out), read_all(tmp_path / "bf16")
    for name, value in fp32.items():
        assert bf16[name].dtype == ml_dtypes.bfloat16
        expected = torch.from_numpy(value).to(torch.bfloat16).view(torch.int16).numpy()
        np.testing.assert_array_equal(bf16[name].view(np.int16), expected, err_msg=name)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def make_word_tokenizer(out_dir: Path, num_tokens: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, num_tokens)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))


def test_tokenizer_larger_than_vocabulary_is_refused(tmp_path):
    checkpoint = random_checkpoint(tmp_path, qk_norm=False, tie=True, vocab_size=64)
    make_word_tokenizer(tmp_path / "tok", num_tokens=100)
    with pytest.raises(ConversionError, match="100 tokens but model.vocab_size=64"):
        hf.checkpoint_to_hf(checkpoint, tmp_path / "out", tokenizer=tmp_path / "tok")
    assert not list(tmp_path.glob("out/*"))  # refused before anything was written


def edited_config_dir(tmp_path: Path, source: Path, **changes) -> Path:
    target = tmp_path / "edited"
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("changes,message", [
    (dict(architectures=["GPTNeoXForCausalLM"]), "architecture 'GPTNeoXForCausalLM' is not supported"),
    (dict(foo_scale=2.0), r"config fields \['foo_scale'\]"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_type='llama3'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_theta=1.0), "disagree"),
])
def test_unmappable_configs_are_named(imported, tmp_path, changes, message):
    _, _, root, _ = imported
    with pytest.raises(ConversionError, match=message):
        hf.hf_to_checkpoint(edited_config_dir(tmp_path, root / "hf", **changes), tmp_path / "ckpt",
                            default_config())
    assert not (tmp_path / "ckpt").exists()


def test_cli_round_trip_reports_peak_memory(tmp_path):
    source = tmp_path / "hf"
    hf_reference_model("qwen3", source, tie=False)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    done = subprocess.run([*tool, "from-hf", "--hf", str(source), "--out", str(tmp_path / "ckpt"),
                           "--mesh.data=1", "--mesh.fsdp=4"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "peak host memory" in done.stdout
    done = subprocess.run([*tool, "to-hf", "--checkpoint", str(tmp_path / "ckpt"),
                           "--out", str(tmp_path / "out"), "--dtype", "fp32"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    source_tensors, exported = read_all(source), read_all(tmp_path / "out")
    assert all(exported[k].tobytes() == v.tobytes() for k, v in source_tensors.items())


def test_cli_rejects_unknown_mesh_override(tmp_path):
    spec = importlib.util.spec_from_file_location("cli", REPO / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(ConfigError, match="--mesh.bogus=2"):
        tool.main(["from-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "ckpt"), "--mesh.bogus=2"])


def test_export_reads_each_parameter_once_and_alone(tmp_path, monkeypatch):
    """Streaming: to-hf restores one stacked parameter per read, and each only once (parameter-major)."""
    checkpoint = random_checkpoint(tmp_path, qk_norm=True, tie=False, vocab_size=64)
    reads, real_load = [], ckpt.load_params

    def counting_load(path, step=None, shardings=None, only=None):
        reads.append(jax.tree_util.tree_flatten_with_path(only, is_leaf=lambda x: x is None)[0])
        return real_load(path, step, shardings, only)

    monkeypatch.setattr(ckpt, "load_params", counting_load)
    hf.checkpoint_to_hf(checkpoint, tmp_path / "out", dtype="fp32")
    assert all(len(leaves) == 1 for leaves in reads)
    paths = [jax.tree_util.keystr(leaves[0][0]) for leaves in reads]
    assert len(paths) == len(set(paths)) == len(jax.tree.leaves(ckpt.params_metadata(checkpoint)))
