"""With the `tpu` extra installed, CPU processes must not probe for a TPU (delay, libtpu warnings)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from plamo_jax import platforms

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")


@needs_libtpu
def test_importing_plamo_jax_keeps_a_cpu_process_quiet():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY")}
    code = "import plamo_jax, jax; print(jax.devices()[0].platform)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu"
    assert "TPU" not in done.stderr, done.stderr


def test_platform_choice():
    choose = platforms.platforms_without_tpu
    assert choose(None, libtpu_installed=True, tpu_chips=False, nvidia_gpu=False) == "cpu"
    assert choose(None, libtpu_installed=True, tpu_chips=False, nvidia_gpu=True) == "cuda,cpu"
    assert choose(None, libtpu_installed=True, tpu_chips=True, nvidia_gpu=False) is None  # a TPU VM
    assert choose("tpu", libtpu_installed=True, tpu_chips=False, nvidia_gpu=False) is None  # user's choice
    assert choose(None, libtpu_installed=False, tpu_chips=False, nvidia_gpu=True) is None  # nothing to skip


def test_runs_on_cpu_follows_jax_platforms():
    assert platforms.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert not platforms.runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not platforms.runs_on_cpu({"JAX_PLATFORMS": "tpu"})
