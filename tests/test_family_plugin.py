"""A model family defined only here, registered through the public registry, trains like the built-in ones.

GPT-J's block: one norm, attention and a GELU MLP in parallel, x + attn(norm(x)) + mlp(norm(x)). Nothing
under plamo_jax/ knows it: it trains sharded, resumes exactly, reports its own FLOPs (two MLP matmuls,
not SwiGLU's three) and memory estimate, and refuses a checkpoint of another family.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import small_config
from test_memory_estimate import HIGH, LOW

from plamo_jax.convert import hf
from plamo_jax.errors import ConfigError, ConversionError
from plamo_jax.estimate import memory
from plamo_jax.models import flops, registry
from plamo_jax.models.attention import Attention
from plamo_jax.models.family import SHARED_ACTIVATION_SHARDS, FamilySpec, require, require_divisible
from plamo_jax.models.layers import RMSNorm, compute_dtype, normal, output_init_std, param
from plamo_jax.parallel.rules import constrain, sharding_context
from plamo_jax.train.checkpoint import Checkpointer
from plamo_jax.train.run import build_run
from plamo_jax.train.trainer import train


class GeluMLP(nnx.Module):
    """fc_out(gelu(fc_in(x))): GPT-J's MLP, two matmuls."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.dtype = compute_dtype(cfg)
        self.fc_in = param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"))
        self.fc_out = param(rngs, normal(output_init_std(cfg)), (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"))

    def __call__(self, x_BLD):
        hidden = jax.nn.gelu(jnp.einsum("bld,df->blf", x_BLD, self.fc_in[...].astype(self.dtype)))
        hidden = constrain(hidden, ("act_batch", "act_length", "act_mlp"))
        return constrain(jnp.einsum("blf,fd->bld", hidden, self.fc_out[...].astype(self.dtype)),
                         ("act_batch", "act_length", "act_embed"))


class ParallelBlock(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.attn = Attention.from_config(cfg, qk_norm="none", rngs=rngs)
        self.mlp = GeluMLP(cfg, rngs=rngs)

    def __call__(self, x_BLD, segment_ids_BL, positions_BL, block_index):
        hidden = self.norm(x_BLD)
        return x_BLD + self.attn(hidden, segment_ids_BL, positions_BL) + self.mlp(hidden), {}


def validate(cfg, sizes):
    require(cfg.mlp_dim > 0, "mlp_dim", cfg.mlp_dim, "a positive width")
    require_divisible(cfg, "mlp_dim", sizes["tensor"], "the tensor-parallel mesh size mesh.tensor")


def forward_flops_per_token(cfg, seq_len):
    per_layer = flops.attention_flops_per_token(cfg, seq_len) + 2 * 2 * cfg.d_model * cfg.mlp_dim
    return cfg.num_layers * per_layer + flops.lm_head_flops_per_token(cfg)


PARALLEL = FamilySpec(
    name="gptj_parallel",
    block=ParallelBlock,
    validate=validate,
    architecture_keys=("mlp_dim",),
    forward_flops_per_token=forward_flops_per_token,
    activation_shards={**SHARED_ACTIVATION_SHARDS, "mlp_dim": "act_mlp"},
)


@pytest.fixture
def parallel_family():
    registry.register_family(PARALLEL)
    yield PARALLEL
    registry.FAMILIES.pop(PARALLEL.name)


def parallel_config(tmp_path, steps: int, **mesh):
    config = small_config(family=PARALLEL.name, qk_norm=False)
    config.model.vocab_size = 512  # the byte tokenizer's 259 ids fit
    config.train.update(steps=steps, global_batch_size=8, seq_len=32, log_every=2,
                        output_dir=str(tmp_path / "run"))
    config.mesh.update(data=-1, **mesh)
    config.checkpoint.update(enabled=True, every_steps=4, async_save=False)
    config.optimizer.update(warmup_steps=2, learning_rate=3e-3, schedule="constant")  # steps-independent
    return config


def test_registered_family_trains_sharded_and_resumes_exactly(parallel_family, tmp_path):
    whole = train(parallel_config(tmp_path / "whole", 8, fsdp=2, tensor=2))
    assert whole.final_step == 8 and np.isfinite(whole.last_metrics["loss"])
    first = train(parallel_config(tmp_path / "split", 4, fsdp=2, tensor=2))
    assert first.final_step == 4
    resumed = train(parallel_config(tmp_path / "split", 8, fsdp=2, tensor=2))
    assert resumed.final_step == 8
    assert resumed.last_metrics["loss"] == whole.last_metrics["loss"]  # bitwise: resumed == uninterrupted
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state["params"]),
                 jax.device_get(whole.state["params"]))
    assert whole.last_metrics["loss"] < first.last_metrics["loss"] + 0.5  # it trains (no blow-up)


def test_registered_family_reports_its_own_flops(parallel_family, tmp_path):
    config = parallel_config(tmp_path, 1)
    config.model.update(d_model=256, num_heads=8, num_kv_heads=4, head_dim=32, mlp_dim=1024)
    config.model.scan_unroll = config.model.num_layers  # XLA counts a loop body once
    config.mesh.update(data=1)
    run = build_run(config, jax.devices()[:1])
    assert run.flops_per_token == 3 * forward_flops_per_token(config.model, 32)
    dense = registry.get_family("dense").forward_flops_per_token(config.model, 32)
    assert 3 * dense > 1.15 * run.flops_per_token  # SwiGLU's third matmul would be counted otherwise
    with sharding_context(run.mesh, run.rules):
        compiled = run.step.lower(run.abstract_state(), run.abstract_batch(), None).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert 0.95 < cost["flops"] / (run.flops_per_token * run.tokens_per_step) < 1.2


def test_registered_family_memory_estimate_matches_xla(parallel_family, tmp_path):
    config = parallel_config(tmp_path, 1)
    config.mesh.update(data=1, fsdp=8)
    estimate = memory.estimate_memory(config, 8, host_kernels=True)
    xla = memory.xla_memory(config, jax.devices()[:8])
    assert estimate.bytes_of("parameters") + estimate.bytes_of("optimizer states") + estimate.bytes_of(
        "input batch") == xla.argument
    assert LOW <= estimate.total / xla.peak <= HIGH, (estimate.table(), xla)


def test_registered_family_refuses_a_checkpoint_of_another_family(parallel_family, tmp_path):
    dense = parallel_config(tmp_path / "dense", 4)
    dense.model.family = "dense"
    train(dense)
    config = parallel_config(tmp_path / "parallel", 4)
    config.checkpoint.init_params = str(tmp_path / "dense" / "run" / "checkpoints")
    with pytest.raises(ConfigError, match=r"checkpoint\.init_params=.*model\.family='gptj_parallel' "
                                          r"\(checkpoint: 'dense'\)"):
        train(config)
    config = parallel_config(tmp_path / "dense", 8)  # the dense run's output_dir: resuming would be wrong
    with pytest.raises(ConfigError, match=r"train\.output_dir=.*model\.family='gptj_parallel'"):
        train(config)
    assert Checkpointer(tmp_path / "dense" / "run" / "checkpoints", every_steps=4).all_steps() == [4]
    with pytest.raises(ConversionError, match="model.family='gptj_parallel' has no Hugging Face format"):
        hf.export_hf({}, config.model, tmp_path / "hf")
