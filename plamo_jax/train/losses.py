"""Masked losses in fp32: next-token cross entropy with PaLM z-loss, and per-sequence log-likelihoods."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(
    logits_BLV: jax.Array, targets_BL: jax.Array, loss_mask_BL: jax.Array, z_loss: float
) -> dict[str, jax.Array]:
    """Masked sums (not means), so microbatches and shards combine exactly by addition.

    Returns sums of cross entropy, z-loss (z * log(Z)^2 per token), correct predictions, and the
    token count. The objective is (cross_entropy + z_loss) / tokens.
    """
    logits = logits_BLV.astype(jnp.float32)
    mask = loss_mask_BL.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
    cross_entropy = (log_normalizer - target_logit) * mask
    z_term = z_loss * jnp.square(log_normalizer) * mask
    correct = (jnp.argmax(logits, axis=-1) == targets_BL).astype(jnp.float32) * mask
    return {
        "cross_entropy": cross_entropy.sum(),
        "z_loss": z_term.sum(),
        "correct": correct.sum(),
        "tokens": mask.sum(),
    }


def sequence_log_probs(
    logits_BLV: jax.Array, targets_BL: jax.Array, loss_mask_BL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of log p(target) over masked-in positions [B], masked-in tokens [B]) per row, in fp32."""
    logits = logits_BLV.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
    log_probs = target_logit - jax.nn.logsumexp(logits, axis=-1)
    mask = loss_mask_BL.astype(jnp.float32)
    return jnp.sum(log_probs * mask, axis=-1), jnp.sum(mask, axis=-1)
