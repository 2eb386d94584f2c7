"""Sampling from a checkpoint for a quick look at a model (not a serving engine).

Every step runs the whole fixed-length buffer through the model (one compiled shape, causal
masking makes the unused tail irrelevant), so it works for every family without a cache; the
hybrid family's cached recurrent decoding is `plamo_jax.models.hybrid.greedy_generate`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_next(logits_V: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Greedy at temperature 0; otherwise nucleus sampling over the smallest set with mass >= top_p."""
    if temperature <= 0:
        return jnp.argmax(logits_V)
    log_probs = jax.nn.log_softmax(logits_V.astype(jnp.float32) / temperature)
    order = jnp.argsort(-log_probs)
    cumulative = jnp.cumsum(jnp.exp(log_probs[order]))
    keep_sorted = cumulative - jnp.exp(log_probs[order]) < top_p  # always keeps the most likely token
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    return jax.random.categorical(key, jnp.where(keep, log_probs, -jnp.inf))


def generate(
    graphdef: nnx.GraphDef,
    params,
    prompt_ids: np.ndarray,
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """Tokens generated after `prompt_ids`, stopping after a stop id or `max_new_tokens`."""
    length = len(prompt_ids) + max_new_tokens
    buffer = np.zeros((1, length), np.int32)
    buffer[0, : len(prompt_ids)] = prompt_ids

    @jax.jit
    def next_token(params, tokens, position, key):
        model = nnx.merge(graphdef, params)
        logits, _ = model(tokens, jnp.ones_like(tokens), jnp.arange(length)[None])
        return sample_next(logits[0, position], key, temperature, top_p)

    key = jax.random.key(seed)
    generated: list[int] = []
    for position in range(len(prompt_ids) - 1, length - 1):
        key, step_key = jax.random.split(key)
        token = int(next_token(params, buffer, position, step_key))
        generated.append(token)
        buffer[0, position + 1] = token
        if token in stop_ids:
            break
    return generated
