"""MFU's denominator: configured, the vendor figure per compute dtype, or measured on the device."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import pytest
from helpers import small_config

from plamo_jax.train import peak_flops


class FakeDevice:
    platform = "gpu"

    def __init__(self, kind: str):
        self.device_kind = kind


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAMO_JAX_CACHE", str(tmp_path))
    return tmp_path / "peak_flops.json"


def test_vendor_figures_depend_on_the_compute_dtype(cache):
    model = small_config().model
    h100 = FakeDevice("NVIDIA H100 80GB HBM3")
    model.dtype = "bfloat16"
    assert peak_flops.peak_flops(0.0, model, device=h100).flops_per_device == 989e12
    model.fp8 = True
    assert peak_flops.peak_flops(0.0, model, device=h100).flops_per_device == 1979e12  # not the bf16 figure
    model.fp8, model.dtype = False, "float32"
    assert peak_flops.peak_flops(0.0, model, device=h100).flops_per_device == 495e12
    tpu = peak_flops.peak_flops(0.0, model, device=FakeDevice("TPU v5 lite"))
    assert tpu.flops_per_device == 197e12 and tpu.source == "vendor"
    assert not cache.exists()  # nothing was measured


def test_a_configured_peak_wins_and_says_so():
    peak = peak_flops.peak_flops(123.0, small_config().model, device=FakeDevice("NVIDIA H100"))
    assert (peak.flops_per_device, peak.source) == (123.0, "configured")


def test_an_unknown_device_without_calibration_shows_no_mfu(cache):
    assert peak_flops.peak_flops(0.0, small_config().model, calibrate=False) is None  # the CPU here


def test_the_measured_peak_is_a_timed_matmul_and_is_cached(cache):
    model = small_config().model  # float32 on this host's CPU: no vendor figure
    peak = peak_flops.peak_flops(0.0, model)
    assert peak.source == "measured" and "2048^3 float32 matmuls" in peak.how
    # An independent timing in this process: a 1024^3 matmul, best of three.
    a = jnp.ones((1024, 1024), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = min(timed(matmul, a) for _ in range(3))
    independent = 2 * 1024**3 / best
    assert 0 < peak.flops_per_device and 0.2 < peak.flops_per_device / independent < 5.0
    again = peak_flops.peak_flops(0.0, model)
    assert again.flops_per_device == peak.flops_per_device and "cached in" in again.how


def timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x).block_until_ready()
    return time.perf_counter() - start
