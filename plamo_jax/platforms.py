"""Keep JAX from probing for a TPU on machines that have none.

The `tpu` extra (the TPU compiler, for ahead-of-time compilation) installs libtpu, and JAX then tries
to initialise a TPU backend in every process: about two seconds and a screenful of libtpu warnings on
a CPU or GPU machine. Unless the user chose platforms (JAX_PLATFORMS or jax.config), a machine without
TPU chips gets the platforms it does have. Compile-only TPU devices
(`jax.experimental.topologies.get_topology_desc(..., platform="tpu")`) work either way.
`runs_on_cpu` answers, before JAX starts, whether it will run on the CPU (for CPU-only process set-up,
plamo_jax/host_memory.py).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Mapping

import jax


def has_tpu_chips() -> bool:
    # TPU VMs expose their chips as /dev/accel* (v2-v4) or VFIO groups (v5e, v5p, v6e).
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def has_nvidia_gpu() -> bool:
    cuda_plugin = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
    return cuda_plugin and bool(glob.glob("/dev/nvidia[0-9]*"))


def runs_on_cpu(environ: Mapping[str, str]) -> bool:
    """True when JAX will run on the CPU: JAX_PLATFORMS says so, or there is no TPU chip or NVIDIA GPU."""
    chosen = environ.get("JAX_PLATFORMS", "")
    if chosen:
        return chosen.split(",")[0].strip() == "cpu"
    return not has_tpu_chips() and not has_nvidia_gpu()


def platforms_without_tpu(configured: str | None, libtpu_installed: bool, tpu_chips: bool,
                          nvidia_gpu: bool) -> str | None:
    """The platforms to restrict JAX to, or None to leave JAX's own choice."""
    if configured or not libtpu_installed or tpu_chips:
        return None
    return "cuda,cpu" if nvidia_gpu else "cpu"


def skip_absent_tpu() -> None:
    """Restrict JAX to the local platforms when libtpu is installed but no TPU chip is present."""
    chosen = platforms_without_tpu(
        configured=os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms,
        libtpu_installed=importlib.util.find_spec("libtpu") is not None,
        tpu_chips=has_tpu_chips(),
        nvidia_gpu=has_nvidia_gpu(),
    )
    if chosen:
        jax.config.update("jax_platforms", chosen)
