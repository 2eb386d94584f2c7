"""`model.scan_layers=False`: the decoder's blocks in a Python loop equal the scanned stack.

Every family, with and without rematerialisation, on one device and sharded (fsdp x tensor, and the
pipeline's stage axis): loss and gradients equal the scanned blocks' (fp32). The loop really replaces
the scan: the traced loss holds no scan over the blocks.
"""

import jax
import jax.extend.core
import numpy as np
import pytest
from helpers import initial_host_params, loss_and_grads, mesh_of, random_batch, small_config

from plamo_jax.configuration import mesh_rules
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import state as state_lib
from plamo_jax.train.objectives.lm import lm_loss_sums

FAMILIES = {
    "dense": dict(num_layers=3),
    "hybrid": dict(family="hybrid", num_layers=4, attention_window=5, full_attention_layers=(3,),
                   ssm_chunk_size=4),
    "moe": dict(family="moe", num_layers=3, num_experts=4, num_experts_per_token=2, expert_mlp_dim=32),
}


def config_for(family: str, **overrides):
    config = small_config(**{**FAMILIES[family], **overrides})
    config.train.global_batch_size, config.train.seq_len = 8, 16
    return config


def assert_same(result, reference):
    (loss, grads), (ref_loss, ref_grads) = result, reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), grads, ref_grads)


@pytest.mark.parametrize("family,remat", [("dense", "none"), ("dense", "full"), ("hybrid", "none"),
                                          ("moe", "full")])
def test_layer_loop_equals_the_scanned_stack(family, remat):
    scanned, looped = config_for(family, remat=remat), config_for(family, remat=remat, scan_layers=False)
    params = initial_host_params(scanned)
    batch = random_batch(np.random.default_rng(0), 8, 16, scanned.model.vocab_size)
    one_device = mesh_of(data=1)
    assert_same(loss_and_grads(looped, one_device, params, batch),
                loss_and_grads(scanned, one_device, params, batch))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("mesh_sizes", [dict(fsdp=2, tensor=4), dict(stage=2, data=2)],
                         ids=["fsdp_tensor", "stage"])
def test_sharded_layer_loop_equals_one_device(mesh_sizes):
    scanned = config_for("dense", num_layers=4)
    looped = config_for("dense", num_layers=4, scan_layers=False)
    looped.mesh.update(mesh_sizes)
    params = initial_host_params(scanned)
    batch = random_batch(np.random.default_rng(1), 8, 16, scanned.model.vocab_size)
    assert_same(loss_and_grads(looped, mesh_of(**mesh_sizes), params, batch),
                loss_and_grads(scanned, mesh_of(data=1), params, batch))


def scans_over_blocks(config) -> list[int]:
    """The lengths of the scans over all the blocks in the traced loss (the layer scan's, if any)."""
    mesh = mesh_of(data=1)
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    params = jax.device_put(initial_host_params(config), setup.param_shardings)
    batch = random_batch(np.random.default_rng(0), 8, 16, config.model.vocab_size)
    with sharding_context(mesh, rules):
        jaxpr = jax.make_jaxpr(lambda p: lm_loss_sums(setup.graphdef, p, batch, config.model, 0.0))(params)
    lengths = []

    def walk(inner):
        lengths.extend(e.params["length"] for e in inner.eqns if e.primitive.name == "scan")
        for sub in jax.extend.core.subjaxprs(inner):
            walk(sub)

    walk(jaxpr.jaxpr)
    return [length for length in lengths if length == config.model.num_layers]


def test_the_loop_replaces_the_layer_scan():
    assert scans_over_blocks(config_for("dense")) == [3]
    assert scans_over_blocks(config_for("dense", scan_layers=False)) == []
