"""model.attention_impl=cudnn and auto: the arguments handed to cuDNN's fused attention mean our masks,
checked on CPU by running JAX's reference implementation with the very same arguments against our dense
attention (values, gradients, the max-logit statistic); which kernel auto picks where; and clear errors
where cuDNN cannot run. The kernel itself runs in benchmarks/gpu_check.sh on an NVIDIA GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_attention_inputs, small_config

from plamo_jax.configuration import validate_config
from plamo_jax.errors import ConfigError
from plamo_jax.estimate.memory import estimate_memory
from plamo_jax.models import attention_statistics, kernels
from plamo_jax.models.attention import dot_product_attention_with_max_logit, resolve_attention_impl
from plamo_jax.models.cudnn_attention import cudnn_attention_with_max_logit
from plamo_jax.models.masks import attention_mask


def random_inputs(seed, length=40, **shape):
    return random_attention_inputs(seed, length=length, **shape)


def check_against_dense(q, k, v, segments, upstream, window, tokens=None):
    def ours(q, k, v, window):
        out, max_logit = cudnn_attention_with_max_logit(q, k, v, segments, window, tokens,
                                                        implementation="xla")
        return jnp.sum(out * upstream), max_logit

    def dense(q, k, v, window):
        mask = attention_mask(segments, window, tokens)
        out, max_logit = dot_product_attention_with_max_logit(q, k, v, mask)
        return jnp.sum(out * upstream), max_logit

    (value, max_logit), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(q, k, v, window)
    (expected, expected_max), expected_grads = jax.value_and_grad(dense, argnums=(0, 1, 2), has_aux=True)(
        q, k, v, window)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(max_logit, expected_max, rtol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("window", [0, 1, 7])
def test_static_window_and_documents_equal_dense_attention(window):
    """Causal and the window in the kernel (cuDNN's (pos - w, pos] window), documents as the mask."""
    check_against_dense(*random_inputs(window), window)


def test_a_traced_window_goes_into_the_mask():
    """Hybrid stacks with full-attention layers pass the window as a traced scalar."""
    q, k, v, segments, upstream = random_inputs(3)
    for window in (0, 6):
        check_against_dense(q, k, v, segments, upstream, jnp.int32(window))


def test_a_permuted_token_order_goes_into_the_mask():
    q, k, v, segments, upstream = random_inputs(4)
    tokens = np.random.default_rng(0).permutation(q.shape[1])
    check_against_dense(q, k, v, segments, upstream, 0, tokens)


def test_max_logit_in_query_blocks_equals_one_block():
    q, k, _, segments, _ = random_inputs(5, length=48)
    mask = attention_mask(segments, 0)
    max_allowed_logit = attention_statistics.max_allowed_logit
    whole = max_allowed_logit(q, k, mask, query_block=48)
    np.testing.assert_allclose(max_allowed_logit(q, k, mask, query_block=16), whole, rtol=1e-6)
    _, dense = dot_product_attention_with_max_logit(q, k, q[:, :, :2], mask)
    np.testing.assert_allclose(whole, dense, rtol=1e-6)


@pytest.mark.parametrize("platform,dtype,head_dim,length,expected", [
    ("gpu", jnp.bfloat16, 64, 2048, "cudnn"),
    ("gpu", jnp.float16, 256, 16384, "cudnn"),
    ("gpu", jnp.float32, 64, 2048, "dense"),  # cuDNN takes half precision only
    ("gpu", jnp.bfloat16, 12, 2048, "dense"),  # head_dim not a multiple of 8
    ("gpu", jnp.bfloat16, 64, 32768, "flash"),  # the document bias would be [B, 1, 32K, 32K]
    ("cpu", jnp.bfloat16, 64, 2048, "dense"),
    ("tpu", jnp.bfloat16, 64, 4096, "splash"),
    ("tpu", jnp.float16, 64, 4096, "flash"),  # splash takes float32 and bfloat16
])
def test_auto_picks_cudnn_on_gpu_where_it_applies(platform, dtype, head_dim, length, expected):
    with kernels.kernels_for(platform):
        assert resolve_attention_impl("auto", dtype, head_dim, length) == expected
        assert resolve_attention_impl("flash", dtype, head_dim, length) == "flash"


def test_explicit_cudnn_where_it_cannot_run_is_a_config_error():
    with kernels.kernels_for("cpu"), pytest.raises(ConfigError, match="needs an NVIDIA GPU, tracing for cpu"):
        resolve_attention_impl("cudnn", jnp.bfloat16, 64, 128)
    too_wide = "head_dim a multiple of 8 up to 256, got 300"
    with kernels.kernels_for("gpu"), pytest.raises(ConfigError, match=too_wide):
        resolve_attention_impl("cudnn", jnp.bfloat16, 300, 128)
    config = small_config(attention_impl="cudnn", dtype="float32")
    wrong_dtype = r"model.attention_impl='cudnn'.*bfloat16 or float16 inputs, got float32"
    with pytest.raises(ConfigError, match=wrong_dtype):
        validate_config(config, 1)


def test_the_estimates_of_cudnn_and_splash_count_flash_residuals():
    """cuDNN and splash save what flash saves (output, log-normaliser): on a GPU device the estimate of
    cudnn and of auto (which picks it) equals flash's, on a TPU that of auto (splash) too; dense differs."""
    def total(impl, device="h100"):
        config = small_config(attention_impl=impl, dtype="bfloat16")
        config.train.seq_len = 256
        return estimate_memory(config, 1, device=device).total

    flash = total("flash")
    assert total("cudnn") == flash
    assert total("auto") == flash
    # the walk models each compiler's fusion (estimate/liveness.py), so compare within the TPU
    on_tpu = [total(impl, device="v5p") for impl in ("auto", "splash", "flash", "dense")]
    assert on_tpu[0] == on_tpu[1] == on_tpu[2] != on_tpu[3]
