"""Batch-size ramp-up: the global batch as a function of the samples consumed (Megatron's rule).

Megatron-LM's `--rampup-batch-size START INCREMENT SAMPLES` grows the global batch from START by
INCREMENT every SAMPLES / ((GLOBAL - START) / INCREMENT) consumed samples, and holds it at GLOBAL
once SAMPLES have been consumed. Since the batch size of each step depends only on the batches
before it, it is a fixed function of the step: this module lays the run out in phases of constant
size once, so the data pipeline, the jitted step and the learning-rate schedule all see the same
function of the step and resume stays exact.

The learning-rate schedule runs on consumed samples: `progress(step)` counts them in batches of the
full global size (warmup and total steps keep their meaning when a ramp is switched on).
"""

from __future__ import annotations

import bisect
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections


def megatron_batch_size(consumed_samples: int, start: int, increment: int, ramp_samples: int,
                        final: int) -> int:
    """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator rule for the next global batch."""
    if consumed_samples > ramp_samples:
        return final
    samples_per_increment = ramp_samples / ((final - start) // increment)
    return start + int(consumed_samples / samples_per_increment) * increment


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    """Phases of constant batch size: (first step, global batch size, samples consumed before it)."""

    final: int
    phases: tuple[tuple[int, int, int], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(size for _, size, _ in self.phases)

    def _phase(self, step: int) -> tuple[int, int, int]:
        return self.phases[bisect.bisect_right([first for first, _, _ in self.phases], step) - 1]

    def batch_size(self, step: int) -> int:
        """Global batch of the step with 0-based index `step` (the step counter before it runs)."""
        return self._phase(step)[1]

    def samples_before(self, step: int) -> int:
        first, size, consumed = self._phase(step)
        return consumed + (step - first) * size

    def progress(self, step: jax.Array) -> jax.Array:
        """Consumed samples in units of full batches, traceable (the optimizer's step count)."""
        firsts = jnp.asarray([first for first, _, _ in self.phases])
        sizes = jnp.asarray([size for _, size, _ in self.phases], jnp.float32)
        consumed = jnp.asarray([c for _, _, c in self.phases], jnp.float32)
        index = jnp.searchsorted(firsts, step, side="right") - 1
        samples = consumed[index] + (step - firsts[index]) * sizes[index]
        return samples / self.final


def make_ramp(train_cfg: ml_collections.ConfigDict) -> BatchRamp | None:
    """The run's ramp, or None without one (train.rampup_* = 0)."""
    start, increment, ramp_samples = (int(train_cfg[k]) for k in
                                      ("rampup_batch_start", "rampup_batch_increment", "rampup_samples"))
    final = int(train_cfg.global_batch_size)
    if not (start and increment and ramp_samples):
        return None
    phases, consumed, step = [], 0, 0
    while True:
        size = megatron_batch_size(consumed, start, increment, ramp_samples, final)
        if not phases or phases[-1][1] != size:
            phases.append((step, size, consumed))
        if size == final:
            return BatchRamp(final, tuple(phases))
        consumed += size
        step += 1
