"""Guards inside the jitted step: a bad step leaves the model as it was.

A step is skipped (parameters and optimizer state unchanged, the step counter still advances so the
data stays aligned) when
- its loss, its gradient norm or the updated parameters are not finite, or
- its loss or gradient norm spikes: above mean + sigma x std of the last `window` healthy steps
  (once `warmup` healthy steps have been seen; OLMo-core's and MaxText's skip-on-spike rule).
Only healthy steps enter the window, so a run of bad batches does not raise the bar for the next.

The spike test sees an update one step late: a step's loss is computed with the parameters the
previous update made. A bad batch spikes once and the next batch is fine; a bad *update* spikes every
batch after it, and skipping cannot cure it because the parameters it skips from are the ones that
spike. The two spikes are told apart by what they mean after that:
- a gradient-norm spike with a normal loss that outlasts `patience` consecutive skipped steps is a new
  gradient-norm level (norms shift for good after a learning-rate change, in low precision, late in
  training): the step applies (clipping bounds it) and enters the window, as an unguarded run would;
- a lasting loss spike is never taken: the model is already damaged, and the host rewinds
  (train.rewind_after) or stops the run (train.max_bad_steps) with the good checkpoints kept.
Non-finite steps are never taken.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

HEALTHY, NOT_FINITE, LOSS_SPIKE, GRAD_SPIKE = 0, 1, 2, 3
REASONS = {NOT_FINITE: "not finite", LOSS_SPIKE: "loss spike", GRAD_SPIKE: "gradient-norm spike"}


@dataclasses.dataclass(frozen=True)
class GuardSettings:
    spike_sigma: float  # 0: no spike test
    window: int
    warmup: int
    patience: int  # consecutive gradient-norm spike skips before the new level is taken; 0: never

    @classmethod
    def from_config(cls, train_cfg: ml_collections.ConfigDict) -> GuardSettings:
        return cls(float(train_cfg.spike_sigma), int(train_cfg.spike_window), int(train_cfg.spike_warmup),
                   int(train_cfg.spike_patience))


def initial_state(settings: GuardSettings) -> dict[str, jax.Array]:
    """healthy: healthy steps seen; bad_in_a_row: consecutive skipped steps (grad_spikes_in_a_row: the
    gradient-norm spikes among them); taken: lasting gradient-norm spikes taken as the new level; the
    windows are rings."""
    # distinct arrays: the state is donated to the step, and one buffer cannot be donated twice
    window = lambda: jnp.zeros((settings.window,), jnp.float32)
    counter = lambda: jnp.zeros((), jnp.int32)
    return {"losses": window(), "grad_norms": window(), "healthy": counter(), "bad_in_a_row": counter(),
            "grad_spikes_in_a_row": counter(), "skipped": counter(), "taken": counter()}


def _spikes(window: jax.Array, value: jax.Array, count: jax.Array, settings: GuardSettings) -> jax.Array:
    """Whether `value` exceeds mean + sigma x std of the window's first min(count, size) entries."""
    used = jnp.minimum(count, settings.window)
    valid = jnp.arange(settings.window) < used
    n = jnp.maximum(used, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, window, 0.0)) / n
    variance = jnp.sum(jnp.where(valid, jnp.square(window - mean), 0.0)) / n
    active = (settings.spike_sigma > 0) & (count >= settings.warmup)
    return active & (value > mean + settings.spike_sigma * jnp.sqrt(variance))


def assess(guard: dict, loss: jax.Array, grad_norm: jax.Array, new_param_norm: jax.Array,
           settings: GuardSettings) -> tuple[jax.Array, dict]:
    """(reason code: HEALTHY or why the step is skipped, the guard state after this step)."""
    loss, grad_norm = loss.astype(jnp.float32), grad_norm.astype(jnp.float32)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(new_param_norm)
    count = guard["healthy"]
    loss_spike = _spikes(guard["losses"], loss, count, settings)
    grad_spike = _spikes(guard["grad_norms"], grad_norm, count, settings)
    grad_only = finite & grad_spike & ~loss_spike
    lasting = grad_only & (settings.patience > 0) & (guard["grad_spikes_in_a_row"] >= settings.patience)
    reason = jnp.select([~finite, loss_spike & ~lasting, grad_spike & ~lasting],
                        [NOT_FINITE, LOSS_SPIKE, GRAD_SPIKE], HEALTHY).astype(jnp.int32)
    healthy = reason == HEALTHY
    slot = count % settings.window
    updated = {
        "losses": jnp.where(healthy, guard["losses"].at[slot].set(loss), guard["losses"]),
        "grad_norms": jnp.where(healthy, guard["grad_norms"].at[slot].set(grad_norm), guard["grad_norms"]),
        "healthy": count + healthy.astype(jnp.int32),
        "bad_in_a_row": jnp.where(healthy, 0, guard["bad_in_a_row"] + 1).astype(jnp.int32),
        "grad_spikes_in_a_row": jnp.where(grad_only & ~lasting, guard["grad_spikes_in_a_row"] + 1,
                                          0).astype(jnp.int32),
        "skipped": guard["skipped"] + (~healthy).astype(jnp.int32),
        "taken": guard["taken"] + lasting.astype(jnp.int32),
    }
    return reason, updated


def guard_metrics(reason: jax.Array, guard: dict) -> dict[str, jax.Array]:
    return {"guard/skip_reason": reason, "guard/skipped": guard["skipped"],
            "guard/bad_in_a_row": guard["bad_in_a_row"], "guard/grad_levels_taken": guard["taken"]}
