"""Device mesh from the `mesh` config section, and multi-process start-up."""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh

from plamo_jax.errors import ConfigError
from plamo_jax.parallel.rules import MESH_AXES

log = logging.getLogger(__name__)


def resolve_axis_sizes(
    mesh_cfg: ml_collections.ConfigDict, num_devices: int
) -> tuple[dict[str, int], dict[str, int]]:
    """(ICI sizes, DCN sizes) per axis; at most one ICI size may be -1 and takes what remains."""
    dcn = {axis: int(mesh_cfg.get(f"dcn_{axis}", 1)) for axis in MESH_AXES}
    ici = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    for axis, size in list(ici.items()) + [(f"dcn_{a}", s) for a, s in dcn.items()]:
        if size == 0 or size < -1:
            raise ConfigError(f"config key mesh.{axis}={size}: expected a positive size or -1")
    fill = [axis for axis, size in ici.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(
            f"config keys mesh.{', mesh.'.join(fill)} are all -1: at most one axis may be -1"
        )
    known = math.prod(s for s in ici.values() if s != -1) * math.prod(dcn.values())
    if fill:
        if num_devices % known:
            raise ConfigError(
                f"config key mesh.{fill[0]}=-1: the other mesh axes multiply to {known}, which does not "
                f"divide the {num_devices} devices"
            )
        ici[fill[0]] = num_devices // known
    total = math.prod(ici.values()) * math.prod(dcn.values())
    if total != num_devices:
        sizes = ", ".join(f"{a}={ici[a] * dcn[a]}" for a in MESH_AXES)
        raise ConfigError(
            f"config section mesh ({sizes}) has {total} devices but {num_devices} are available; "
            "expected the product of mesh sizes to equal the device count"
        )
    return ici, dcn


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A mesh with axes (stage, data, fsdp, expert, sequence, tensor): stage outermost (pipeline stages
    across the slowest links), tensor innermost (fastest links)."""
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = resolve_axis_sizes(mesh_cfg, len(devices))
    ici_shape = [ici[a] for a in MESH_AXES]
    dcn_shape = [dcn[a] for a in MESH_AXES]
    if math.prod(dcn_shape) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices)
    elif devices[0].platform in ("gpu", "tpu"):
        grid = _torus_mesh(ici_shape, devices)
    else:  # CPU devices have no interconnect topology to follow
        grid = np.array(devices).reshape(ici_shape)
    return Mesh(grid, MESH_AXES)


def _torus_mesh(ici_shape: list[int], devices: list) -> np.ndarray:
    """Topology-aware placement: each mesh axis on whole physical torus axes where the sizes allow; else
    (e.g. expert=8 on a 4x4x4 slice) physical axes are split between mesh axes, as MaxText's
    allow_split_physical_axes does: it runs, but a split axis's collectives lose their wrap-around links."""
    try:
        return mesh_utils.create_device_mesh(ici_shape, devices=devices)
    except NotImplementedError:
        grid = mesh_utils.create_device_mesh(ici_shape, devices=devices, allow_split_physical_axes=True)
        sizes = ", ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, ici_shape, strict=True)
                          if size > 1)
        log.warning("mesh (%s) does not fit the slice's physical axes whole; physical axes are split "
                    "between mesh axes (slower collectives on those axes)", sizes)
        return grid


def make_abstract_mesh(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> AbstractMesh:
    """The mesh's axes and sizes for `num_devices` devices that need not exist (planning, estimates)."""
    ici, dcn = resolve_axis_sizes(mesh_cfg, num_devices)
    return AbstractMesh(tuple(ici[a] * dcn[a] for a in MESH_AXES), MESH_AXES)


def launched_distributed(environ: Mapping[str, str]) -> bool:
    """Whether these variables launch the process as one of several (maybe_initialize_distributed)."""
    return environ.get("PLAMO_DISTRIBUTED") == "auto" or bool(environ.get("PLAMO_COORDINATOR"))


def maybe_initialize_distributed() -> None:
    """Start jax.distributed when launched as one of several processes.

    Reads PLAMO_COORDINATOR (host:port), PLAMO_NUM_PROCESSES, PLAMO_PROCESS_ID (set by the local
    launcher or a job script); with PLAMO_DISTRIBUTED=auto, JAX detects SLURM and TPU-VM clusters itself.
    """
    if not launched_distributed(os.environ):
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if os.environ.get("PLAMO_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return
    jax.distributed.initialize(
        coordinator_address=os.environ["PLAMO_COORDINATOR"],
        num_processes=int(os.environ["PLAMO_NUM_PROCESSES"]),
        process_id=int(os.environ["PLAMO_PROCESS_ID"]),
    )


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
