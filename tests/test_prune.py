"""Structured pruning and depth up-scaling (plamo_jax/convert/prune.py, tools/prune.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import loss_and_grads, mesh_of, random_batch, small_config

from plamo_jax import cli
from plamo_jax.convert import hf, prune
from plamo_jax.data.sources import read_builtin_documents
from plamo_jax.evaluate.perplexity import evaluate_perplexity
from plamo_jax.models import registry
from plamo_jax.models.decoder import Decoder
from plamo_jax.train import checkpoint as ckpt
from plamo_jax.train.run import build_model

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prune_tool", REPO / "tools" / "prune.py")
prune_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prune_tool)


def family_config(name: str):
    """Tiny run configs of the three families (shapes as in tests/test_moe.py, test_hybrid.py)."""
    if name == "moe":
        return small_config(family="moe", num_experts=4, num_experts_per_token=2, expert_mlp_dim=32,
                            init_std=0.1)
    if name == "hybrid":
        return small_config(family="hybrid", ssm_num_heads=4, ssm_head_dim=16, ssm_state_dim=8,
                            ssm_chunk_size=4, mamba_step=2, num_layers=4, attention_window=6,
                            full_attention_layers=(3,), norm_eps=1e-6, init_std=0.1)
    return small_config(init_std=0.1)


def perturbed_params(cfg, seed: int = 0) -> dict:
    """Initial parameters with the norms moved away from their constant start, so channels differ."""
    params = jax.device_get(nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)), nnx.Param)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x) + (0.3 * rng.standard_normal(x.shape).astype(np.float32)
                                         if "norm" in jax.tree_util.keystr(path) else 0.0), params)


@nnx.jit
def _forward(model, ids, segment_ids, positions):
    return model(ids, segment_ids, positions)[0]


def model_of(cfg, params):
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def logits_of(cfg, params, batch) -> np.ndarray:
    ids, segments, positions = (jnp.asarray(batch[k]) for k in ("input_ids", "segment_ids", "positions"))
    return np.asarray(_forward(model_of(cfg, params), ids, segments, positions))


@pytest.fixture(scope="module", params=["dense", "moe", "hybrid"])
def calibrated(request):
    """(family name, model config, params, a packed batch, importance scores over two batches)."""
    cfg = family_config(request.param).model
    params = perturbed_params(cfg)
    batches = [random_batch(np.random.default_rng(seed), 4, 16, cfg.vocab_size) for seed in (0, 1)]
    return request.param, cfg, params, batches[0], prune.calibrate(cfg, params, batches)


def test_probes_rerun_the_model_and_pruning_to_the_same_shape_is_the_identity(calibrated):
    name, cfg, params, batch, scores = calibrated
    # the probed forward (which gathers the activations) is the model's forward
    run_block = prune.block_runner(cfg, prune.layout_of(registry.get_family(cfg)))
    x, _, depth = prune.probe_batch(run_block, prune.host_blocks(cfg, params), jnp.asarray(params["embed"]),
                                    batch, cfg.dtype)
    model = model_of(cfg, params)
    np.testing.assert_allclose(np.asarray(model.logits(x)), logits_of(cfg, params, batch), atol=2e-5, rtol=0)
    assert all(d > 0 for d in depth)

    keep = prune.choose_indices(cfg, scores, {})
    same_params, same_cfg = prune.prune_params(params, cfg, keep, {})
    assert registry.architecture_differences(same_cfg, cfg) == []
    np.testing.assert_array_equal(logits_of(same_cfg, same_params, batch), logits_of(cfg, params, batch))


def test_depth_up_scaling_leaves_the_logits_unchanged(calibrated):
    name, cfg, params, batch, _ = calibrated
    per_block = registry.get_family(cfg).layers_per_block(cfg)
    grown, grown_cfg, sources = prune.grow_params(params, cfg, 2 * per_block)
    assert grown_cfg.num_layers == cfg.num_layers + 2 * per_block
    assert sources == [0, 0, 1, 1]
    if name == "hybrid":  # layer 3 (full attention) is in block 1, which is now blocks 2 and 3
        assert grown_cfg.full_attention_layers == (5, 7)
        out_proj = grown["blocks"]["layer_0"]["mixer"]["out_proj"]
        assert not out_proj[1].any() and out_proj[0].any()
    mlp_scope = ("layer_1", "mlp") if name == "hybrid" else ("mlp",)
    down, original_down = node(grown, mlp_scope)["down"], np.asarray(node(params, mlp_scope)["down"])
    assert not down[1].any() and not down[3].any()  # the copies add nothing to the residual stream
    np.testing.assert_array_equal(down[2], original_down[1])
    np.testing.assert_array_equal(node(grown, mlp_scope)["up"][1],  # a copy keeps its inputs
                                  np.asarray(node(params, mlp_scope)["up"])[0])
    np.testing.assert_array_equal(logits_of(grown_cfg, grown, batch), logits_of(cfg, params, batch))


# Larger widths per family: query heads in more KV groups and more per group, neurons, SSM heads.
WIDER = {
    "dense": dict(mlp_dim=192, num_heads=12, num_kv_heads=4),
    "moe": dict(num_heads=16, num_kv_heads=8),
    "hybrid": dict(mlp_dim=160, num_heads=12, num_kv_heads=6, ssm_num_heads=6),
}


@pytest.mark.parametrize("name", ["dense", pytest.param("moe", marks=pytest.mark.slow),
                                  pytest.param("hybrid", marks=pytest.mark.slow)])
def test_width_growth_leaves_the_logits_unchanged(name):
    cfg = family_config(name).model
    params = perturbed_params(cfg)
    batch = random_batch(np.random.default_rng(0), 4, 16, cfg.vocab_size)
    wide, wide_cfg = prune.grow_width(params, cfg, WIDER[name], seed=1)
    for key, value in WIDER[name].items():
        assert wide_cfg[key] == value
    attn = ("layer_1", "mixer") if name == "hybrid" else ("attn",)
    group, new_group = cfg.num_heads // cfg.num_kv_heads, wide_cfg.num_heads // wide_cfg.num_kv_heads
    old = np.arange(cfg.num_heads) // group * new_group + np.arange(cfg.num_heads) % group
    new = np.setdiff1d(np.arange(wide_cfg.num_heads), old)
    q, o = node(wide, attn)["q_proj"], node(wide, attn)["o_proj"]
    np.testing.assert_array_equal(q[:, :, old], node(params, attn)["q_proj"])  # each head stays in its group
    assert q[:, :, new].std() > 0 and not o[:, new].any()  # new heads read, but write nothing
    if name == "hybrid":  # new SSM heads must not feed the B, C, dt that the old heads read
        mixer = node(wide, ("layer_0", "mixer"))
        assert not mixer["bcdt_proj"][:, 4:].any() and not mixer["out_proj"][:, 4:].any()
        np.testing.assert_array_equal(mixer["in_proj"][:, :, :4],
                                      node(params, ("layer_0", "mixer"))["in_proj"])
    np.testing.assert_allclose(logits_of(wide_cfg, wide, batch), logits_of(cfg, params, batch),
                               atol=1e-5, rtol=0)


# Smaller targets per family: every prunable dimension at once.
TARGETS = {
    "dense": dict(d_model=48, num_heads=4, num_kv_heads=2, mlp_dim=64, num_layers=1),
    "moe": dict(d_model=48, num_heads=2, num_kv_heads=1, num_experts=3, num_layers=1),
    "hybrid": dict(d_model=48, num_heads=6, num_kv_heads=3, mlp_dim=64, ssm_num_heads=2, num_layers=2),
}


def sliced(weight: np.ndarray, *index_per_axis) -> np.ndarray:
    """numpy reference: weight[np.ix_(...)] with None meaning the whole axis."""
    return weight[np.ix_(*[np.arange(n) if idx is None else np.asarray(idx)
                           for n, idx in zip(weight.shape, index_per_axis, strict=True)])]


def test_pruning_keeps_exactly_the_chosen_indices(calibrated):
    name, cfg, params, batch, scores = calibrated
    target = TARGETS[name]
    keep = prune.choose_indices(cfg, scores, target)
    small, small_cfg = prune.prune_params(params, cfg, keep, target)
    for key, value in target.items():
        assert small_cfg[key] == value
    blocks = keep[(prune.GLOBAL, prune.LAYERS)]
    channels = keep[(prune.GLOBAL, prune.EMBED)]
    # hidden channels: the most important by norm-output magnitude, the same in every parameter
    ranked_channels = np.argsort(-scores[(prune.GLOBAL, prune.EMBED)], kind="stable")
    np.testing.assert_array_equal(channels, np.sort(ranked_channels[:target["d_model"]]))
    np.testing.assert_array_equal(small["embed"], params["embed"][:, channels])
    np.testing.assert_array_equal(small["final_norm"]["scale"], params["final_norm"]["scale"][channels])
    # depth: the blocks that turn their input most
    depth = scores[(prune.GLOBAL, prune.LAYERS)]
    assert set(blocks) == set(np.argsort(-depth)[:len(blocks)])

    attn = ("layer_1", "mixer") if name == "hybrid" else ("attn",)
    heads, kv = keep[(attn, "heads")], keep[(attn, "kv_heads")]
    group = cfg.num_heads // cfg.num_kv_heads
    per_group = target["num_heads"] // target["num_kv_heads"]
    for layer, block in enumerate(blocks):
        # GQA: whole KV groups, the same number of query heads from each kept group, in order
        np.testing.assert_array_equal(heads[block] // group, np.repeat(kv[block], per_group))
        original, pruned = node(params, attn), node(small, attn)
        np.testing.assert_array_equal(pruned["q_proj"][layer],
                                      sliced(original["q_proj"][block], channels, heads[block], None))
        np.testing.assert_array_equal(pruned["k_proj"][layer],
                                      sliced(original["k_proj"][block], channels, kv[block], None))
        np.testing.assert_array_equal(pruned["o_proj"][layer],
                                      sliced(original["o_proj"][block], heads[block], None, channels))
        if name == "moe":
            experts = keep[(("mlp",), "expert")][block]
            np.testing.assert_array_equal(
                experts, np.sort(np.argsort(-scores[(("mlp",), "expert")][block], kind="stable")[:3]))
            mlp, original_mlp = small["blocks"]["mlp"], params["blocks"]["mlp"]
            np.testing.assert_array_equal(mlp["router"][layer],
                                          sliced(original_mlp["router"][block], channels, experts))
            np.testing.assert_array_equal(mlp["down"][layer],
                                          sliced(original_mlp["down"][block], experts, None, channels))
        else:
            scope = ("layer_0", "mlp") if name == "hybrid" else ("mlp",)
            neurons = keep[(scope, "mlp")][block]
            np.testing.assert_array_equal(
                neurons, np.sort(np.argsort(-scores[(scope, "mlp")][block], kind="stable")[:64]))
            np.testing.assert_array_equal(node(small, scope)["gate"][layer],
                                          sliced(node(params, scope)["gate"][block], channels, neurons))
            np.testing.assert_array_equal(node(small, scope)["down"][layer],
                                          sliced(node(params, scope)["down"][block], neurons, channels))
        if name == "hybrid":
            ssm = keep[(("layer_0", "mixer"), "ssm_heads")][block]
            mixer, original_mixer = node(small, ("layer_0", "mixer")), node(params, ("layer_0", "mixer"))
            np.testing.assert_array_equal(mixer["in_proj"][layer],
                                          sliced(original_mixer["in_proj"][block], channels, ssm, None, None))
            np.testing.assert_array_equal(mixer["A_log"][layer], original_mixer["A_log"][block][ssm])
            # the mixer's own norms are not d_model wide and stay whole
            np.testing.assert_array_equal(mixer["dt_norm"]["scale"][layer],
                                          original_mixer["dt_norm"]["scale"][block])


def node(params, scope):
    tree = params["blocks"]
    for key in scope:
        tree = tree[key]
    return tree


def test_random_indices_have_the_same_shapes(calibrated):
    name, cfg, params, batch, scores = calibrated
    keep = prune.choose_indices(cfg, prune.random_scores(scores, seed=1), TARGETS[name])
    ranked = prune.choose_indices(cfg, scores, TARGETS[name])
    assert {k: v.shape for k, v in keep.items()} == {k: v.shape for k, v in ranked.items()}
    assert any(not np.array_equal(keep[k], ranked[k]) for k in keep)
    again = prune.choose_indices(cfg, prune.random_scores(scores, seed=1), TARGETS[name])
    assert all(np.array_equal(keep[k], again[k]) for k in keep)  # seeded


# ------------------------------------------------------------------------------------------ the tool


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    config = family_config("dense")
    config.model.tie_embeddings = False
    path = tmp_path_factory.mktemp("dense") / "ckpt"
    ckpt.save_params(path, perturbed_params(config.model), config)
    return path


def test_tool_writes_a_checkpoint_with_its_indices_that_trains_and_exports(dense_checkpoint, tmp_path):
    out = tmp_path / "pruned"
    assert cli.call(prune_tool.main, [str(dense_checkpoint), str(out), "--d-model", "48", "--mlp-dim", "64",
                                      "--num-heads", "4", "--num-kv-heads", "2", "--batches", "2"]) == 0
    params, config = ckpt.load_params(out)
    original, _ = ckpt.load_params(dense_checkpoint)
    record = np.load(out / "pruning.npz")
    summary = json.loads((out / "pruning.json").read_text())
    assert summary["mode"] == "importance" and summary["after"]["d_model"] == 48
    channels, neurons = record["keep/embed"], record["keep/mlp/mlp"]
    assert record["score/embed"].shape == (64,) and channels.shape == (48,)
    np.testing.assert_array_equal(params["lm_head"], original["lm_head"][channels])
    np.testing.assert_array_equal(params["blocks"]["mlp"]["up"][1],
                                  sliced(original["blocks"]["mlp"]["up"][1], channels, neurons[1]))
    assert (config.model.d_model, config.model.num_heads, config.model.mlp_dim) == (48, 4, 64)

    # it trains: one step's loss and gradients are finite
    batch = random_batch(np.random.default_rng(0), 8, 16, config.model.vocab_size)
    loss, grads = loss_and_grads(config, mesh_of(data=1), params, batch)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))

    # it exports: transformers computes our logits
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf.checkpoint_to_hf(out, tmp_path / "hf", dtype="fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(batch["input_ids"][:2], dtype=torch.long)).logits.float().numpy()
    ours = logits_of(config.model, params, {"input_ids": batch["input_ids"][:2],
                                            "segment_ids": np.ones((2, 16), np.int32),
                                            "positions": np.broadcast_to(np.arange(16), (2, 16))})
    assert theirs.std() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_tool_grows_a_checkpoint_that_trains(dense_checkpoint, tmp_path):
    out = tmp_path / "grown"
    assert cli.call(prune_tool.main, [str(dense_checkpoint), str(out), "--grow-layers", "2"]) == 0
    params, config = ckpt.load_params(out)
    original, original_config = ckpt.load_params(dense_checkpoint)
    assert config.model.num_layers == 4
    assert json.loads((out / "pruning.json").read_text())["block_sources"] == [0, 0, 1, 1]
    batch = random_batch(np.random.default_rng(0), 8, 16, config.model.vocab_size)
    np.testing.assert_array_equal(logits_of(config.model, params, batch),
                                  logits_of(original_config.model, original, batch))
    loss, grads = loss_and_grads(config, mesh_of(data=1), params, batch)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    # the copies' zeroed output projections are what training moves first
    assert np.abs(grads["blocks"]["attn"]["o_proj"][1]).max() > 0

    wide = tmp_path / "wide"
    assert cli.call(prune_tool.main, [str(dense_checkpoint), str(wide), "--grow-width", "--mlp-dim", "256",
                                      "--num-heads", "16", "--num-kv-heads", "8", "--seed", "3"]) == 0
    params, config = ckpt.load_params(wide)
    assert (config.model.mlp_dim, config.model.num_heads, config.model.num_kv_heads) == (256, 16, 8)
    np.testing.assert_allclose(logits_of(config.model, params, batch),
                               logits_of(original_config.model, original, batch), atol=1e-5, rtol=0)


BAD_INPUTS = {
    "a checkpoint that does not exist": (
        ["/nonexistent/ckpt", "{out}", "--d-model", "32"], "/nonexistent/ckpt"),
    "a target larger than the model": (["{ckpt}", "{out}", "--d-model", "128"], "--d-model 128"),
    "the model's own shape": (["{ckpt}", "{out}", "--mlp-dim", "128"], "own shape"),
    "no target": (["{ckpt}", "{out}"], "no target shape"),
    "heads that do not divide into the KV groups": (
        ["{ckpt}", "{out}", "--num-heads", "6", "--num-kv-heads", "4"], "--num-heads 6"),
    "more query heads per group than the model has": (
        ["{ckpt}", "{out}", "--num-kv-heads", "1"], "--num-kv-heads 1"),
    "a width the family does not have": (["{ckpt}", "{out}", "--num-experts", "2"], "--num-experts 2"),
    "a depth growth of no layers": (["{ckpt}", "{out}", "--grow-layers", "0"], "--grow-layers 0"),
    "growth with a target": (["{ckpt}", "{out}", "--grow-layers", "2", "--d-model", "32"], "--grow-layers"),
    "width growth of d_model": (["{ckpt}", "{out}", "--grow-width", "--d-model", "128"], "--d-model 128"),
    "width growth to a smaller width": (
        ["{ckpt}", "{out}", "--grow-width", "--mlp-dim", "64"], "--mlp-dim 64"),
    "width growth without sizes": (["{ckpt}", "{out}", "--grow-width"], "--grow-width"),
    "no calibration batch": (["{ckpt}", "{out}", "--d-model", "32", "--batches", "0"], "--batches 0"),
    "a calibration corpus that does not exist": (
        ["{ckpt}", "{out}", "--d-model", "32", "--calibration", "/nonexistent/corpus.jsonl"],
        "/nonexistent/corpus.jsonl"),
    "an output that holds files": (["{ckpt}", "{ckpt}", "--d-model", "32"], "not an empty directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_with_exit_status_2(case, dense_checkpoint, tmp_path, capsys):
    arguments, named = BAD_INPUTS[case]
    arguments = [a.replace("{ckpt}", str(dense_checkpoint)).replace("{out}", str(tmp_path / "out"))
                 for a in arguments]
    try:
        status = cli.call(prune_tool.main, arguments)
    except SystemExit as exit_:  # argparse-level errors exit through cli.fail
        status = exit_.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_the_command_line_answers_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "tools/prune.py", "/nonexistent/ckpt", str(tmp_path / "out"),
                           "--d-model", "32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith("error: ") and "/nonexistent/ckpt" in lines[-1], done.stderr


# ------------------------------------------------------------------------------------------ quality


def heldout_loss(checkpoint: Path, corpus: Path) -> float:
    params, config = ckpt.load_params(checkpoint)
    run = build_model(config, jax.devices()[:1])
    return evaluate_perplexity(run, params, str(corpus), seq_len=128, batch_size=8)[0]["cross_entropy"]


@pytest.mark.slow
def test_importance_ranked_pruning_beats_random_indices(tmp_path):
    """A tiny model trained on 90% of the bundled corpus, pruned to about half its parameters.

    The baseline is random pruning's expected held-out loss (the mean over seeds), not its luckiest draw.
    What a random draw gets wrong is depth: the draws that drop the first block end at 3.7-3.9, which the
    block scores never do. On a model this small and briefly trained the rest is close to a coin toss
    (measured, held-out cross entropy: ranked 2.65, random draws that keep the first block 2.56-2.58):
    the head target leaves two choices (one of two KV groups) and the ranked one was the worse; the block
    scores (1 - cos) drop the last block where dropping the second did better (2.58); the ranked
    d_model channels and MLP neurons beat every random draw of them (2.65 vs 2.61-2.75, 2.72-2.83).
    """
    documents = read_builtin_documents()
    cut = len(documents) * 9 // 10
    for name, part in (("train", documents[:cut]), ("heldout", documents[cut:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    train = [sys.executable, "launch/train.py", "--config", "configs/tiny.py",
             f"--config.data.source={tmp_path / 'train.jsonl'}"]
    subprocess.run([*train, "--config.train.steps=150", "--config.checkpoint.every_steps=150",
                    f"--config.train.output_dir={tmp_path / 'teacher'}"], cwd=REPO, check=True,
                   capture_output=True, timeout=900)
    teacher = tmp_path / "teacher" / "checkpoints"
    target = ["--d-model", "96", "--mlp-dim", "192", "--num-heads", "2", "--num-kv-heads", "1",
              "--num-layers", "3", "--calibration", str(tmp_path / "train.jsonl"), "--batches", "8"]
    assert cli.call(prune_tool.main, [str(teacher), str(tmp_path / "ranked"), *target]) == 0
    seeds = range(4)
    for seed in seeds:
        assert cli.call(prune_tool.main, [str(teacher), str(tmp_path / f"random{seed}"), *target,
                                          "--random-indices", "--seed", str(seed)]) == 0
    heldout = tmp_path / "heldout.jsonl"
    losses = {name: heldout_loss(tmp_path / name if name != "teacher" else teacher, heldout)
              for name in ("teacher", "ranked", *(f"random{seed}" for seed in seeds))}
    print("held-out cross entropy:", {k: round(v, 4) for k, v in losses.items()})
    assert losses["teacher"] < losses["ranked"]
    assert losses["ranked"] < np.mean([losses[f"random{seed}"] for seed in seeds])

    # the pruned checkpoint trains from checkpoint.init_params with its new shapes
    _, config = ckpt.load_params(tmp_path / "ranked")
    shape = [f"--config.model.{key}={config.model[key]}"
             for key in ("d_model", "mlp_dim", "num_heads", "num_kv_heads", "num_layers")]
    done = subprocess.run([*train, *shape, "--config.train.steps=20", "--config.checkpoint.every_steps=20",
                           f"--config.checkpoint.init_params={tmp_path / 'ranked'}",
                           f"--config.train.output_dir={tmp_path / 'healed'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    losses["ranked + 20 steps"] = heldout_loss(tmp_path / "healed" / "checkpoints", heldout)
    print("held-out cross entropy:", {k: round(v, 4) for k, v in losses.items()})
    assert losses["ranked + 20 steps"] < losses["ranked"]
