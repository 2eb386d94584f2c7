"""AdamW with decoupled, masked weight decay; warmup + cosine / warmup-stable-decay schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from plamo_jax.errors import ConfigError
from plamo_jax.train.batch_ramp import BatchRamp

SCHEDULES = ("cosine", "wsd", "constant")
WSD_DECAY_SHAPES = ("linear", "cosine", "sqrt")


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    peak, warmup = opt.learning_rate, opt.warmup_steps
    floor = peak * opt.min_lr_ratio
    warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if opt.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=opt.min_lr_ratio)
    elif opt.schedule == "wsd":
        decay_steps = max(int(round(total_steps * opt.wsd_decay_fraction)), 1)
        stable_steps = max(total_steps - warmup - decay_steps, 0)

        def main(step):
            progress = jnp.clip((step - stable_steps) / decay_steps, 0.0, 1.0)
            if opt.wsd_decay_shape == "linear":
                remaining = 1.0 - progress
            elif opt.wsd_decay_shape == "cosine":
                remaining = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
            else:  # "sqrt" (1 - sqrt), as in MiniCPM's WSD
                remaining = 1.0 - jnp.sqrt(progress)
            return floor + (peak - floor) * remaining
    else:
        raise ConfigError(f"config key optimizer.schedule={opt.schedule!r}: expected one of {SCHEDULES}")
    return optax.join_schedules([warmup_fn, main], [warmup])


def run_schedule(opt: ml_collections.ConfigDict, total_steps: int, ramp: BatchRamp | None) -> optax.Schedule:
    """The learning rate at each optimizer step: under a ramp, of the samples consumed before it."""
    if ramp is None:
        return learning_rate_schedule(opt, total_steps)
    on_samples = learning_rate_schedule(opt, ramp.samples_before(total_steps) / ramp.final)
    return lambda count: on_samples(ramp.progress(count))


def decay_mask(params, no_decay: str):
    """True for parameters that get weight decay: path contains none of the excluded substrings."""
    excluded = [s.strip() for s in no_decay.split(",") if s.strip()]

    def keep(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not any(s in name for s in excluded)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   ramp: BatchRamp | None = None) -> optax.GradientTransformation:
    """AdamW; under a batch-size ramp the schedule runs on consumed samples (in full-batch units)."""
    schedule = run_schedule(opt, total_steps, ramp)
    adamw = optax.adamw(
        schedule,
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=lambda params: decay_mask(params, opt.no_decay),
    )
    if opt.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)
    return adamw
