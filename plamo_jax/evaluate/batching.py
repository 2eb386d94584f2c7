"""How evaluation batches split over a run's mesh: rows come in multiples of the batch axes' devices."""

from __future__ import annotations

import math

from plamo_jax.train.run import ModelRun


def batch_shard_count(run: ModelRun) -> int:
    """Devices the batch dimension is split over (data x fsdp x expert under the default rules)."""
    spec = run.batch_sharding.spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(run.mesh.shape[axis] for axis in axes)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
