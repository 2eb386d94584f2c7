"""Continuing from a checkpoint: the family decides which keys must match, and a mismatch is refused by name.

The case that used to go wrong: a Hugging Face Qwen3-MoE with top-1 routing and norm_topk_prob=False,
imported and continued with configs/moe_tiny.py (top-2, renormalised), was silently re-routed. It is
refused, naming every routing key; with the checkpoint's routing given, it continues with the
imported model's own outputs.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import random_batch

from plamo_jax.configuration import load_recipe
from plamo_jax.convert import hf
from plamo_jax.errors import ConfigError
from plamo_jax.models import registry
from plamo_jax.train.checkpoint import load_params
from plamo_jax.train.objectives.lm import lm_loss_sums
from plamo_jax.train.run import build_run
from plamo_jax.train.trainer import train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen3_moe_top1(tmp_path_factory):
    """A transformers-written Qwen3-MoE shaped like moe_tiny, but top-1 without renormalisation."""
    directory = tmp_path_factory.mktemp("qwen3_moe_top1")
    config = transformers.Qwen3MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=96, moe_intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=1,
        norm_topk_prob=False, tie_word_embeddings=True, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(directory)
    checkpoint = tmp_path_factory.mktemp("imported") / "ckpt"
    hf.hf_to_checkpoint(directory, checkpoint, load_recipe("moe_tiny"))
    return checkpoint


def continued(tmp_path, checkpoint, **model):
    config = load_recipe("moe_tiny")
    config.model.update(**model)
    config.train.update(steps=1, global_batch_size=8, seq_len=32, output_dir=str(tmp_path / "run"))
    config.checkpoint.update(init_params=str(checkpoint), async_save=False)
    config.optimizer.learning_rate = 0.0  # the first step must leave the imported model as it was
    return config


def test_other_routing_is_refused_naming_the_routing_keys(qwen3_moe_top1, tmp_path):
    with pytest.raises(ConfigError) as refused:
        train(continued(tmp_path, qwen3_moe_top1))
    message = str(refused.value)
    assert "checkpoint.init_params=" in message
    assert "model.num_experts_per_token=2 (checkpoint: 1)" in message
    assert "model.router_renormalize=True (checkpoint: False)" in message
    assert "model.qk_norm=False (checkpoint: True)" in message  # Qwen3-MoE always has QK-norm
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_with_the_checkpoints_routing_it_continues_the_imported_model(qwen3_moe_top1, tmp_path):
    config = continued(tmp_path, qwen3_moe_top1, num_experts_per_token=1, router_renormalize=False,
                       qk_norm=True)
    result = train(config)
    assert result.final_step == 1
    params, saved = load_params(qwen3_moe_top1)
    assert not registry.architecture_differences(saved.model, config.model)
    # The imported model under its own config gives the loss the continued run starts from.
    batch = random_batch(np.random.default_rng(0), 4, 32, 512)
    run = build_run(saved, jax.devices()[:1])
    imported_sums = lm_loss_sums(run.setup.graphdef, params, batch, saved.model, 0.0)[1]
    continued_params = jax.device_get(result.state["params"])
    continued_sums = lm_loss_sums(run.setup.graphdef, continued_params, batch, config.model, 0.0)[1]
    np.testing.assert_allclose(continued_sums["cross_entropy"], imported_sums["cross_entropy"], rtol=1e-6)


def test_keys_a_family_does_not_use_are_not_compared(tmp_path):
    moe = load_recipe("moe_tiny").model
    saved = moe.to_dict() | {"mlp_dim": 4 * moe.mlp_dim + 1, "ssm_state_dim": 3}  # unused by MoE
    assert registry.architecture_differences(saved, moe) == []
    dense = load_recipe("tiny").model
    assert registry.architecture_differences(dense.to_dict() | {"mlp_dim": 1}, dense) == [
        f"model.mlp_dim={dense.mlp_dim} (checkpoint: 1)"]
