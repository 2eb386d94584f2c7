"""KV-cache decoding for the dense and MoE families: the cached forward equals the full forward pass, and
batched cached generation equals cache-free generation token for token (greedy), with ragged prompts,
per-row stops, sampling and sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import small_config

from plamo_jax.evaluate.generate import Generator, Sampling, generate, generator_for
from plamo_jax.models import registry
from plamo_jax.models.decoder import Decoder
from plamo_jax.models.masks import attention_mask, cached_attention_mask
from plamo_jax.train import state as state_lib
from plamo_jax.train.run import build_model


def model_config(family: str, **overrides):
    # init_std 0.4: a random model whose greedy continuations vary (at 0.02 it repeats one token)
    config = small_config(init_std=0.4, **overrides)
    if family == "moe":
        config.model.update(family="moe", num_experts=4, num_experts_per_token=2, expert_mlp_dim=32,
                            capacity_factor=0.0)
    return config


def test_the_dense_and_moe_families_decode_with_a_cache_and_the_hybrid_does_not():
    assert registry.get_family("dense").cached_decoding and registry.get_family("moe").cached_decoding
    assert not registry.get_family("hybrid").cached_decoding  # its recurrent cache has its own entry points


def test_the_cached_mask_is_the_full_mask_of_a_left_padded_row():
    rng = np.random.default_rng(0)
    valid = np.arange(12)[None, :] >= rng.integers(0, 6, size=(3, 1))
    for window in (0, 3):
        full = np.asarray(attention_mask(jnp.asarray(valid, jnp.int32), window))
        cached = np.asarray(cached_attention_mask(jnp.arange(12), jnp.asarray(valid), window))
        # Real queries see the same keys; padding queries see nothing when cached (their output is unused).
        np.testing.assert_array_equal(cached[:, 0][valid], full[:, 0][valid])


@pytest.mark.parametrize("family, qk_norm", [("dense", True), ("dense", False), ("moe", True)])
def test_prefill_and_steps_through_the_cache_equal_the_full_forward_pass(family, qk_norm):
    config = model_config(family, qk_norm=qk_norm)
    graphdef, params = nnx.split(Decoder(config.model, rngs=nnx.Rngs(1)))

    @jax.jit
    def full_forward(params, tokens, segment_ids, positions):
        return nnx.merge(graphdef, params)(tokens, segment_ids, positions)[0]

    @jax.jit
    def extend(params, tokens, positions, cache, begin, valid):
        return nnx.merge(graphdef, params).extend(tokens, positions, begin, cache, valid)

    rng = np.random.default_rng(1)
    batch, columns, prompt = 3, 20, 8
    tokens = rng.integers(3, 256, size=(batch, columns)).astype(np.int32)
    first_real = np.array([0, 3, 7])[:, None]
    valid = np.arange(columns)[None, :] >= first_real
    positions = np.maximum(np.arange(columns)[None, :] - first_real, 0).astype(np.int32)
    full_logits = full_forward(params, tokens, valid.astype(np.int32), positions)
    cache = nnx.merge(graphdef, params).init_cache(batch, columns)
    # a prefill, single steps, then a chunk of several tokens
    chunks = [(0, prompt)] + [(c, c + 1) for c in range(prompt, 14)] + [(14, columns)]
    for begin, end in chunks:
        logits, cache = extend(params, tokens[:, begin:end], positions[:, begin:end], cache, begin, valid)
        real = valid[:, begin:end]
        # fp32 sums in another order (logits of size ~5 at this init): agreement to ~1e-5 relative
        np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full_logits[:, begin:end])[real],
                                   atol=1e-4, rtol=1e-4)


PROMPT_LENGTHS = (5, 17, 1, 40, 9)
LIMITS = (20, 7, 33, 12, 1)


def prompts(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=["dense", "moe"])
def split_model(request):
    config = model_config(request.param)
    graphdef, params = nnx.split(Decoder(config.model, rngs=nnx.Rngs(2)))
    return config, graphdef, params


def test_cached_generation_equals_cache_free_generation_token_for_token(split_model):
    _, graphdef, params = split_model
    batch = prompts()
    cached = Generator(graphdef, params, cached=True).generate(batch, max_new_tokens=LIMITS)
    buffer = Generator(graphdef, params, cached=False).generate(batch, max_new_tokens=LIMITS)
    assert cached == buffer
    assert [len(row) for row in cached] == list(LIMITS)
    assert len({tuple(row) for row in cached}) == len(batch) and len(set(cached[2])) > 5  # not degenerate
    for index in (2, 3):  # the shortest and the longest prompt
        # one unpadded prompt at a time, the whole buffer re-run per token: the pre-cache algorithm
        prompt = np.asarray(batch[index], np.int32)
        assert generate(graphdef, params, prompt, max_new_tokens=LIMITS[index]) == cached[index]


def test_each_row_stops_at_its_own_stop_token_or_predicate(split_model):
    _, graphdef, params = split_model
    batch = prompts()
    reference = Generator(graphdef, params, cached=True).generate(batch, max_new_tokens=30)
    stop_id = reference[0][4]
    for cached in (True, False):
        generator = Generator(graphdef, params, cached=cached)
        stopped = generator.generate(batch, max_new_tokens=30, stop_ids=(stop_id,))
        for want, got in zip(reference, stopped, strict=True):
            expected = want[: want.index(stop_id) + 1] if stop_id in want else want
            assert got == expected
        # a host-side predicate (a stop string): row 1 stops once it has 3 tokens, checked every 4
        asked = generator.generate(batch, max_new_tokens=30, stop=lambda row, ids: row == 1 and len(ids) >= 3,
                                   check_every=4)
        assert asked[1] == reference[1][:4] and asked[0] == reference[0]


def test_nucleus_sampling_with_a_tiny_top_p_is_greedy_and_samples_repeat_by_seed(split_model):
    _, graphdef, params = split_model
    batch = prompts()
    generator = Generator(graphdef, params, cached=True)
    greedy = generator.generate(batch, max_new_tokens=LIMITS)
    assert generator.generate(batch, max_new_tokens=LIMITS, sampling=Sampling(1.0, 1e-6, 3)) == greedy
    sampled = generator.generate(batch, max_new_tokens=LIMITS, sampling=Sampling(1.0, 1.0, 3))
    assert sampled != greedy
    assert sampled == generator.generate(batch, max_new_tokens=LIMITS, sampling=Sampling(1.0, 1.0, 3))
    cache_free = Generator(graphdef, params, cached=False)
    assert cache_free.generate(batch, max_new_tokens=LIMITS, sampling=Sampling(1.0, 1.0, 3)) == sampled


@pytest.mark.parametrize("family, mesh", [("dense", {"data": 2, "tensor": 2}),
                                          ("moe", {"data": 2, "expert": 2})])
def test_sharded_generation_equals_one_device(family, mesh):
    config = model_config(family)
    single = build_model(config, jax.devices()[:1])
    params = state_lib.init_params(config.model, single.setup, seed=4)
    expected = generator_for(single, params).generate(prompts(1), max_new_tokens=LIMITS)
    config.mesh.update({"data": 1, "fsdp": 1, **mesh})
    sharded = build_model(config, jax.devices()[:4])
    sharded_params = jax.device_put(jax.device_get(params), sharded.setup.param_shardings)
    generator = generator_for(sharded, sharded_params)
    assert generator.cached and generator.batch_multiple == 2 * mesh.get("expert", 1)
    assert generator.generate(prompts(1), max_new_tokens=LIMITS) == expected
