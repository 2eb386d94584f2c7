"""Context parallelism (models/context_attention.py, parallel/context.py) equals one device.

Attention split along the `sequence` axis: every family, ring, all_gather and ulysses, contiguous and
load-balanced layouts, packed documents, windows, the hybrid's Mamba layers in place or with
Megatron's undo/redo, and
composition with the data, fsdp, tensor and expert axes: loss and gradients equal the single-device
pass (fp32). The balanced layout's work is counted against a brute-force mask; the ring's per-device
temporaries are read from XLA's memory analysis.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import initial_host_params, loss_and_grads, mesh_of, random_batch, small_config
from jax.sharding import NamedSharding, PartitionSpec

from plamo_jax.configuration import validate_config
from plamo_jax.errors import ConfigError
from plamo_jax.models.context_attention import context_attention
from plamo_jax.parallel import context
from plamo_jax.parallel.rules import DEFAULT_RULES, sharding_context

LENGTH = 64


def family_config(family: str):
    if family == "dense":
        return small_config()
    if family == "hybrid":  # one window for every attention layer: known at trace time, the ring skips
        return small_config(family="hybrid", num_layers=2, attention_window=5, ssm_chunk_size=4)
    if family == "hybrid_mixed":  # a window and one full-attention layer: a window known only at run time
        return small_config(family="hybrid", num_layers=4, attention_window=5, full_attention_layers=(3,),
                            ssm_chunk_size=4)
    return small_config(family="moe", num_experts=4, num_experts_per_token=2, expert_mlp_dim=32)


_REFERENCES = {}


def reference(family: str):
    """The family's parameters, a packed batch and the single-device (loss, gradients), computed once."""
    if family not in _REFERENCES:
        config = family_config(family)
        params = initial_host_params(config)
        batch = random_batch(np.random.default_rng(0), 4, LENGTH, config.model.vocab_size, max_docs=3)
        _REFERENCES[family] = (params, batch, loss_and_grads(config, mesh_of(data=1), params, batch, False))
    return _REFERENCES[family]


def assert_matches(family, strategy, mesh_sizes, balanced, ssm_context_layout="in_place"):
    config = family_config(family)
    config.model.context_parallel = strategy
    config.model.ssm_context_layout = ssm_context_layout
    params, batch, (ref_loss, ref_grads) = reference(family)
    loss, grads = loss_and_grads(config, mesh_of(**mesh_sizes), params, batch, balanced)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), grads, ref_grads)


# family, strategy, mesh, balanced. The default run keeps two (the suite's 30-minute budget; the train
# step with the default all_gather under sequence=2 x fsdp=4 is tests/test_sharding.py's); `-m slow`
# runs every family, strategy and composed axis.
FAST_CASES = [
    ("dense", "ring", dict(sequence=8), True),
    ("hybrid", "ring", dict(sequence=4, data=2), True),
    ("dense", "ulysses", dict(sequence=4), True),
]
FAMILIES = ("dense", "hybrid_mixed", "moe")
# ulysses splits the 4 key/value heads of small_config over the axis: 2 or 4 shards
SLOW_CASES = [(family, strategy, dict(sequence=shards), balanced)
              for family in FAMILIES for strategy in ("ring", "all_gather")
              for shards in (2, 4, 8) for balanced in (False, True)] + [
    (family, "ulysses", dict(sequence=shards), balanced)
    for family in FAMILIES for shards in (2, 4) for balanced in (False, True)] + [
    ("dense", "all_gather", dict(sequence=2, tensor=2, fsdp=2), True),
    ("moe", "ring", dict(sequence=2, expert=2, data=2), True),
    ("dense", "ulysses", dict(sequence=2, tensor=2, data=2), True),
]


def case_id(family, strategy, mesh_sizes):
    return f"{family}-{strategy}-{'x'.join(f'{a}{n}' for a, n in mesh_sizes.items())}"


FAST_IDS = [case_id(f, s, m) for f, s, m, _ in FAST_CASES]


@pytest.mark.parametrize("family,strategy,mesh_sizes,balanced", FAST_CASES, ids=FAST_IDS)
def test_context_parallel_step_equals_single_device(family, strategy, mesh_sizes, balanced):
    assert_matches(family, strategy, mesh_sizes, balanced)


@pytest.mark.slow
@pytest.mark.parametrize("family,strategy,mesh_sizes,balanced", SLOW_CASES,
                         ids=[f"{case_id(f, s, m)}-{'balanced' if b else 'contiguous'}"
                              for f, s, m, b in SLOW_CASES])
def test_every_context_layout_equals_single_device(family, strategy, mesh_sizes, balanced):
    assert_matches(family, strategy, mesh_sizes, balanced)


# Megatron's undo/redo around the Mamba layers (model.ssm_context_layout), balanced layout only (the
# contiguous one has nothing to undo). The default run keeps one case (the hybrid's reference is shared).
UNDO_REDO_FAST = [("hybrid", "all_gather", dict(sequence=8))]
UNDO_REDO_SLOW = [("hybrid_mixed", strategy, dict(sequence=shards)) for strategy in ("ring", "all_gather")
                  for shards in (2, 4, 8)] + [("hybrid_mixed", "ring", dict(sequence=2, tensor=2, data=2))]


@pytest.mark.parametrize("family,strategy,mesh_sizes", UNDO_REDO_FAST,
                         ids=[case_id(*case) for case in UNDO_REDO_FAST])
def test_mamba_undo_redo_equals_single_device(family, strategy, mesh_sizes):
    assert_matches(family, strategy, mesh_sizes, True, ssm_context_layout="undo_redo")


@pytest.mark.slow
@pytest.mark.parametrize("family,strategy,mesh_sizes", UNDO_REDO_SLOW,
                         ids=[case_id(*case) for case in UNDO_REDO_SLOW])
def test_every_mamba_undo_redo_case_equals_single_device(family, strategy, mesh_sizes):
    assert_matches(family, strategy, mesh_sizes, True, ssm_context_layout="undo_redo")


@pytest.mark.parametrize("shards", [2, 3, 8])
def test_undo_redo_moves_balanced_chunks_to_contiguous_ones_and_back_exactly(shards):
    length = 2 * shards * 3
    order = context.token_order(length, shards, chunks=2)
    values = np.random.default_rng(shards).standard_normal((2, length, 5)).astype(np.float32)
    laid_out = values[:, order]  # what lay_out_batch gives
    axes = ("act_batch", "act_length", "act_embed")
    with sharding_context(mesh_of(sequence=shards), DEFAULT_RULES):
        contiguous = jax.jit(lambda x: context.to_contiguous(x, axes))(laid_out)
        back = jax.jit(lambda x: context.to_balanced(x, axes))(contiguous)
    np.testing.assert_array_equal(contiguous, values)
    np.testing.assert_array_equal(back, laid_out)


def test_balanced_layout_puts_chunks_r_and_2s_minus_1_minus_r_on_shard_r():
    order = context.token_order(16, shards=2, chunks=2)  # 4 chunks of 4 tokens: shard 0 holds 0 and 3
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    batch = {"input_ids": np.arange(32).reshape(2, 16), "loss_mask": np.ones((2, 16), np.float32)}
    laid_out = context.lay_out_batch(batch, shards=2)
    np.testing.assert_array_equal(laid_out["input_ids"][1], 16 + order)
    assert laid_out["loss_mask"].dtype == np.float32


def brute_force_live_blocks(length, shards, balanced, block, window=0):
    """Block pairs with at least one allowed (query, key) pair, from the full [L, L] causal mask."""
    order = context.token_order(length, shards, 2 if balanced else 1).reshape(shards, -1)
    query, key = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = (key <= query) & ((window <= 0) | (query - key < window))
    counts = []
    for shard in range(shards):
        rows = order[shard].reshape(-1, block)
        counts.append(sum(allowed[np.ix_(q_rows, k_cols)].any()
                          for q_rows in rows for k_cols in np.arange(length).reshape(-1, block)))
    return np.array(counts)


def test_balanced_layout_gives_every_shard_the_same_attention_work(capsys):
    length, shards, block = 8192, 8, 128
    balanced = context.live_blocks_per_shard(length, shards, balanced=True, block=block)
    contiguous = context.live_blocks_per_shard(length, shards, balanced=False, block=block)
    assert balanced.max() / balanced.min() <= 1.05
    assert contiguous.max() / contiguous.min() > 5  # the last shard sees every earlier key
    with capsys.disabled():
        print(f"\ncausal attention blocks per shard (L={length}, {shards} shards): balanced max/min "
              f"{balanced.max() / balanced.min():.3f}, contiguous {contiguous.max() / contiguous.min():.1f}")
    for is_balanced in (False, True):  # the count the ring's kernel skips by equals the mask's
        for window in (0, 40):
            np.testing.assert_array_equal(
                context.live_blocks_per_shard(256, 4, balanced=is_balanced, block=16, window=window),
                brute_force_live_blocks(256, 4, is_balanced, 16, window))


def test_a_window_known_at_trace_time_exchanges_blocks_with_neighbours_only():
    assert context.ring_shifts(8, 1, chunk=64, window=0) == tuple(range(8))
    assert context.ring_shifts(8, 1, chunk=64, window=32) == (0, 1)
    assert context.ring_shifts(8, 2, chunk=64, window=32) == (0, 1, 7)  # balanced: both neighbours
    assert context.ring_shifts(8, 1, chunk=64, window=jnp.int32(32)) == tuple(range(8))


def attention_grad_memory(shards: int, strategy: str, length: int = 16384, block: int = 128):
    """Per-device temporary bytes XLA plans for one attention layer's forward + backward."""
    q = jax.ShapeDtypeStruct((1, length, 8, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
    segments = jax.ShapeDtypeStruct((1, length), jnp.int32)
    mesh = mesh_of(sequence=shards)

    def loss(q, k, v, segment_ids):
        out, _ = context_attention(q, k, v, segment_ids, 0, strategy=strategy, block=block)
        return jnp.sum(out * out)

    sharded = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    with sharding_context(mesh, DEFAULT_RULES):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(sharded,) * 4)
        return grad.lower(q, kv, kv, segments).compile().memory_analysis().temp_size_in_bytes


def test_ring_attention_temporaries_shrink_with_the_sequence_axis(capsys):
    ring = {shards: attention_grad_memory(shards, "ring") for shards in (2, 4, 8)}
    gathered = attention_grad_memory(8, "all_gather")
    with capsys.disabled():
        print("\nattention fwd+bwd temporaries per device (MiB): "
              + ", ".join(f"ring x{s} {b / 2**20:.1f}" for s, b in ring.items())
              + f", all_gather x8 {gathered / 2**20:.1f}")
    assert ring[4] / ring[2] < 0.6 and ring[8] / ring[4] < 0.6  # about 1/context (block tiles stay)
    assert ring[8] < 0.6 * gathered


def test_bad_context_settings_are_named_at_start():
    config = small_config(context_parallel="ringg")
    with pytest.raises(ConfigError, match="model.context_parallel='ringg'"):
        validate_config(config, 8)
    config = small_config(family="hybrid", ssm_context_layout="redo")
    with pytest.raises(ConfigError, match="model.ssm_context_layout='redo'"):
        validate_config(config, 8)
    config = small_config(context_parallel="ulysses")  # 4 key/value heads cannot split over 8 shards
    config.mesh.sequence, config.mesh.data = 8, 1
    with pytest.raises(ConfigError, match="model.num_kv_heads=4: expected divisible by mesh.sequence x "
                                          "mesh.tensor = 8"):
        validate_config(config, 8)
    config = small_config()
    config.mesh.sequence, config.mesh.data = 4, 2
    config.train.seq_len = 12  # a multiple of 4 shards, not of their 8 balanced chunks
    with pytest.raises(ConfigError, match="train.seq_len=12: expected divisible by 8"):
        validate_config(config, 8)
