"""Pipeline parallelism (parallel/pipeline.py, models/pipelined_stack.py) equals one device.

Every family under GPipe and the circular schedule, alone and with the data, fsdp, tensor, sequence and
expert axes: loss, gradients and the updated parameters of one train step equal the single-device step
(fp32). Each device holds only its stage's blocks; checkpoints do not depend on the stage count; bad
pipeline configs are named errors at start.
"""

import jax
import numpy as np
import pytest
from helpers import mesh_of, random_batch, small_config

from plamo_jax.configuration import mesh_rules, validate_config
from plamo_jax.convert.hf import checkpoint_to_hf
from plamo_jax.errors import ConfigError
from plamo_jax.estimate.aot import collectives, inside_loops
from plamo_jax.models import pipelined_stack
from plamo_jax.parallel.pipeline import PipelinePlan, PipelineSettings
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import checkpoint as ckpt
from plamo_jax.train import state as state_lib
from plamo_jax.train.objectives.lm import LANGUAGE_MODELING, lm_loss_sums
from plamo_jax.train.optimizer import make_optimizer
from plamo_jax.train.run import build_run
from plamo_jax.train.step import accumulate_gradients, make_train_step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

BATCH, LENGTH = 8, 32


def family_config(family: str, **pipeline):
    """8 scanned blocks (4 for hybrid groups of 2 layers) so that stage=4 x repeats=2 divides them."""
    if family == "dense":
        config = small_config(num_layers=8)
    elif family == "hybrid":  # a window plus one full-attention layer: the block index reaches the blocks
        config = small_config(family="hybrid", num_layers=8, attention_window=5, full_attention_layers=(5,),
                              ssm_chunk_size=4)
    else:
        config = small_config(family="moe", num_layers=8, num_experts=4, num_experts_per_token=2,
                              expert_mlp_dim=32)
    config.train.global_batch_size, config.train.seq_len = BATCH, LENGTH
    config.model.update(pipeline)
    return config


def step_on(config, mesh_sizes, host_params, host_batch):
    """(cross entropy, gradients of the objective, updated parameters, metrics) of one train step on a
    mesh, fetched to the host."""
    config.mesh.update({"data": 1, **mesh_sizes})
    mesh = mesh_of(**mesh_sizes)
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    shardings = state_lib.state_shardings(setup, optimizer)
    params = jax.device_put(host_params, setup.param_shardings)
    state = state_lib.init_state(config.model, setup, optimizer, seed=0, params=params)
    batch_sharding = state_lib.batch_sharding(mesh, rules)
    batch = jax.device_put(host_batch, batch_sharding)

    def loss_sums(params, microbatch):
        return lm_loss_sums(setup.graphdef, params, microbatch, config.model, config.train.z_loss)

    with sharding_context(mesh, rules):
        grads, sums = jax.jit(lambda p, b: accumulate_gradients(loss_sums, p, b, config.train.microbatches))(
            params, batch)
        step = jax.jit(make_train_step(LANGUAGE_MODELING, config, setup.graphdef, optimizer),
                       in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None))
        new_state, metrics = step(state, batch, None)
    tokens = float(sums["tokens"])
    grads = jax.tree.map(lambda g: np.asarray(g) / tokens, jax.device_get(grads))
    return float(sums["cross_entropy"]) / tokens, grads, jax.device_get(new_state["params"]), \
        jax.device_get(metrics)


_REFERENCES = {}


def reference(family: str, microbatches: int):
    """The family's parameters, a full batch (every target counts) and the single-device step.

    MoE's auxiliary losses are per microbatch (as under gradient accumulation), so its single-device
    reference accumulates over the pipeline's microbatches; dense and hybrid take the whole batch at once.
    """
    microbatches = microbatches if family == "moe" else 1
    if (family, microbatches) not in _REFERENCES:
        config = family_config(family)
        config.train.microbatches = microbatches
        setup = state_lib.setup_model(config.model, mesh_of(data=1), mesh_rules(config))
        params = jax.device_get(state_lib.init_params(config.model, setup, seed=0))
        batch = random_batch(np.random.default_rng(0), BATCH, LENGTH, config.model.vocab_size)
        batch["loss_mask"] = np.ones_like(batch["loss_mask"])  # equal tokens per microbatch (MoE's aux)
        _REFERENCES[family, microbatches] = (params, batch, step_on(config, {}, params, batch))
    return _REFERENCES[family, microbatches]


def assert_step_matches(family, mesh_sizes, **pipeline):
    config = family_config(family, **pipeline)
    plan = PipelineSettings.from_config(config.model).plan(8, mesh_sizes["stage"], 8)
    params, batch, (ref_loss, ref_grads, ref_params, ref_metrics) = reference(family, plan.microbatches)
    loss, grads, new_params, metrics = step_on(config, mesh_sizes, params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    jax.tree.map(close, grads, ref_grads)
    jax.tree.map(close, new_params, ref_params)
    for name in ("load_balance_loss", "router_z_loss"):
        if name in ref_metrics:
            np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5)


# The default run keeps the dense GPipe case (the suite's 30-minute budget); `-m slow` runs the rest.
FAST = [
    ("dense", dict(stage=2), dict(remat="full", pipeline_remat_iterations=True)),
    pytest.param("hybrid", dict(stage=2), dict(pipeline_schedule="circular", pipeline_repeats=2),
                 marks=pytest.mark.slow),
    pytest.param("moe", dict(stage=2, expert=2, data=2), {}, marks=pytest.mark.slow),
]
MESHES = {
    "stage4": (dict(stage=4), {}),
    "stage2_fsdp2_tensor2": (dict(stage=2, fsdp=2, tensor=2), {}),
    "stage2_data2_sequence2_ring": (dict(stage=2, data=2, sequence=2), dict(context_parallel="ring")),
    "circular_stage2_repeats2_m4_remat": (dict(stage=2), dict(
        pipeline_schedule="circular", pipeline_repeats=2, pipeline_microbatches=4, remat="full",
        pipeline_remat_iterations=True)),
    "stage2_save_dots": (dict(stage=2, data=4), dict(remat="save_dots")),
    "circular_stage4_repeats2_data2": (dict(stage=4, data=2),
                                       dict(pipeline_schedule="circular", pipeline_repeats=2)),
}


@pytest.mark.parametrize("family,mesh_sizes,pipeline", FAST, ids=["dense", "hybrid", "moe"])
def test_pipelined_step_equals_single_device(family, mesh_sizes, pipeline):
    assert_step_matches(family, mesh_sizes, **pipeline)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dense", "hybrid", "moe"])
@pytest.mark.parametrize("layout", list(MESHES))
def test_pipelined_step_grid(family, layout):
    mesh_sizes, pipeline = MESHES[layout]
    if family == "hybrid" and pipeline.get("pipeline_repeats", 1) * mesh_sizes["stage"] > 4:
        pytest.skip("4 hybrid groups cannot fill 4 stages x 2 repeats")
    assert_step_matches(family, mesh_sizes, **pipeline)


@pytest.mark.slow
def test_pipeline_composes_with_gradient_accumulation():
    """train.microbatches=2 outside, 2 pipeline microbatches inside: the same step."""
    config = family_config("dense")
    params, batch, (ref_loss, _, ref_params, _) = reference("dense", 1)
    config.train.microbatches = 2
    loss, _, new_params, _ = step_on(config, dict(stage=2, data=2), params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), new_params, ref_params)


def test_each_device_holds_only_its_stage():
    """stage=4 x data=2: per-device parameter bytes are about total / 4 (blocks, embedding and head)."""
    config = family_config("dense", tie_embeddings=False)
    setup = state_lib.setup_model(config.model, mesh_of(stage=4, data=2), mesh_rules(config))
    params = state_lib.init_params(config.model, setup, seed=0)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    per_device = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    blocks = params["blocks"]["attn"]["q_proj"]
    assert {shard.data.shape[0] for shard in blocks.addressable_shards} == {2}  # 8 blocks / 4 stages
    norms = sum(leaf.nbytes for leaf in jax.tree.leaves(params["final_norm"]))  # replicated, tiny
    assert set(per_device.values()) == {(total - norms) // 4 + norms}


def test_schedule_arithmetic():
    """Stage-major order puts block (r*S+s)*K+k at [s, r, k]; the bubble is (S-1)/(R*M+S-1)."""
    plan = PipelinePlan(stages=2, microbatches=4, repeats=2, blocks_per_chunk=2)
    assert plan.stage_major_order().reshape(2, 2, 2).tolist() == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert plan.iterations == 9 and plan.bubble_fraction == 1 / 9
    assert PipelinePlan(4, 4, 1, 2).stage_major_order().tolist() == list(range(8))  # GPipe: contiguous


@pytest.mark.parametrize("overrides,mesh,message", [
    (dict(num_layers=6), dict(stage=4, data=2), "model.num_layers=6"),
    (dict(pipeline_microbatches=2), dict(stage=4, data=2), "model.pipeline_microbatches=2"),
    (dict(pipeline_repeats=2), dict(stage=2, data=4), "model.pipeline_repeats=2"),
    (dict(pipeline_schedule="1f1b"), dict(stage=2, data=4), "model.pipeline_schedule='1f1b'"),
    (dict(vocab_size=258), dict(stage=4, data=2), "model.vocab_size=258"),
], ids=["layers", "microbatches", "repeats_need_circular", "schedule", "vocab"])
def test_bad_pipeline_configs_are_named_at_start(overrides, mesh, message):
    config = family_config("dense", **overrides)
    config.mesh.update(mesh)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_config(config, 8)


@pytest.mark.parametrize("rule,value,message", [
    ("layers", "", "mesh.rules.layers=''"),
    ("act_embed", "stage", "mesh.rules.act_embed='stage'"),
])
def test_rules_that_break_the_stages_are_named_at_start(rule, value, message):
    config = family_config("dense")
    config.mesh.update(dict(stage=2, data=4))
    config.mesh.rules[rule] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, 8)


def test_a_batch_the_microbatches_do_not_divide_is_refused_at_start():
    config = family_config("dense", pipeline_microbatches=4)
    config.mesh.update(dict(stage=2, data=4))
    with pytest.raises(ConfigError, match="train.global_batch_size=8"):
        validate_config(config, 8)


def test_checkpoints_do_not_depend_on_the_stage_count(tmp_path):
    """Saved with stage=4, restored with stage=2 and without stages: bit-identical parameters and
    optimizer state; the Hugging Face export equals that of the same weights saved without a pipeline."""
    config = family_config("dense")
    config.mesh.update(dict(stage=4, data=2))
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    setup = state_lib.setup_model(config.model, mesh_of(stage=4, data=2), mesh_rules(config))
    state = state_lib.init_state(config.model, setup, optimizer, seed=3)
    checkpointer = ckpt.Checkpointer(tmp_path / "staged", every_steps=1, keep_last=1)
    assert checkpointer.maybe_save(1, state, {"epoch": 0, "position": 1}, config.to_json())
    checkpointer.wait_until_finished()
    checkpointer.close()
    for sizes in (dict(stage=2, data=4), dict(data=1)):
        other = state_lib.setup_model(config.model, mesh_of(**sizes), mesh_rules(config))
        reader = ckpt.Checkpointer(tmp_path / "staged", every_steps=1, keep_last=1)
        restored, _ = reader.restore_latest(state_lib.abstract_state(other, optimizer))
        reader.close()
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plain = config.copy_and_resolve_references()
    plain.mesh.update(dict(stage=1, data=8))
    ckpt.save_params(tmp_path / "plain", jax.device_get(state["params"]), plain, step=1)
    checkpoint_to_hf(tmp_path / "staged", tmp_path / "hf_staged", dtype="float32")
    checkpoint_to_hf(tmp_path / "plain", tmp_path / "hf_plain", dtype="float32")
    exported = sorted(p.name for p in (tmp_path / "hf_plain").iterdir() if p.suffix == ".safetensors")
    assert exported
    for name in exported:
        assert (tmp_path / "hf_staged" / name).read_bytes() == (tmp_path / "hf_plain" / name).read_bytes()


def loop_reduction_bytes(config, mesh_sizes) -> float:
    """Bytes that the compiled train step all-reduces or reduce-scatters once per loop iteration."""
    config.mesh.update({"data": 1, **mesh_sizes})
    run = build_run(config, jax.devices())
    with sharding_context(run.mesh, run.rules):
        lowered = run.step.lower(run.abstract_state(), run.abstract_batch(), run.abstract_frozen())
        text = lowered.compile().as_text()
    return sum(c.bytes for c in collectives(inside_loops(text)) if c.kind in ("all-reduce", "reduce-scatter"))


def test_weight_gradients_are_reduced_over_data_once_per_step(monkeypatch):
    """With one weight copy per data shard no iteration reduces weight gradients (only activations
    cross); with a shared copy every iteration all-reduces them (the contrast shows the test can fail)."""
    config = family_config("dense", pipeline_microbatches=4)
    config.train.global_batch_size = 16
    block_bytes = 4 * sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(
        state_lib.abstract_model(config.model)[1]["blocks"])) / 8  # one of the 8 blocks, fp32
    with_copies = loop_reduction_bytes(config, dict(stage=2, data=4))
    monkeypatch.setattr(pipelined_stack, "data_copies", lambda *args: 1)
    shared = loop_reduction_bytes(config, dict(stage=2, data=4))
    print(f"\nreduced per iteration: {with_copies:.0f} B with copies, {shared:.0f} B shared; "
          f"one block's weights {block_bytes:.0f} B")
    assert with_copies < block_bytes <= shared
