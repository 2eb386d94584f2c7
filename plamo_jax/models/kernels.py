"""Which platform's kernels a model is traced for.

Some layers pick their kernel by platform (MoE experts: megablox grouped matmuls on TPU, `ragged_dot`
on GPU, a blocked equivalent on CPU; attention's `auto`: splash on TPU, cuDNN on GPU). Tracing normally
targets the default backend; the memory estimator and ahead-of-time compilation trace for another
platform under `kernels_for(platform)`. Pallas TPU kernels traced under `pallas_interpret()` run
through Pallas's interpreter on any backend: how CPU tests check their numerics.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("plamo_jax_kernel_target", default=None)
_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("plamo_jax_pallas_interpret", default=False)


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


@contextlib.contextmanager
def pallas_interpret() -> Iterator[None]:
    """Trace Pallas TPU kernels (splash attention, megablox) in interpret mode: they then run anywhere."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def interpret_pallas() -> bool:
    return _INTERPRET.get()
