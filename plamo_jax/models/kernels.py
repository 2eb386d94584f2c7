"""Which platform's kernels a model is traced for.

Some layers pick their kernel by platform (MoE experts: `ragged_dot` grouped matmuls on GPU / TPU, a
blocked equivalent on CPU). Tracing normally targets the default backend; the memory estimator and
ahead-of-time compilation trace for another platform under `kernels_for(platform)`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("plamo_jax_kernel_target", default=None)


@contextlib.contextmanager
def kernels_for(platform: str) -> Iterator[None]:
    """Trace with the kernels of `platform` ("cpu", "gpu" or "tpu") whatever this host runs."""
    if platform not in PLATFORMS:
        raise ValueError(f"kernel platform {platform!r}: expected one of {PLATFORMS}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform whose kernels are traced now: set by `kernels_for`, else JAX's default backend."""
    return _TARGET.get() or jax.default_backend()
