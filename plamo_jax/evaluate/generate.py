"""Batched generation: greedy or nucleus sampling, per-row stop conditions, a KV cache where there is one.

Rows of different prompt lengths decode together: prompts are left-padded to one column, so every
row's next token goes to the same cache column, while positions (RoPE) count from each row's own
first token and padding columns are masked out of attention. A family whose spec has
`cached_decoding` (dense, MoE) runs the prompts once and then one token per step through its KV
cache (`Decoder.init_cache` / `extend`); any other family re-runs the whole buffer for every token
(one compiled shape; the causal mask keeps the unwritten tail out). That cache-free path is also the
reference the cache is tested against (tests/test_kv_cache.py).

A row stops after one of `stop_ids` (kept in its output), at its own `max_new_tokens`, or when the
host-side predicate `stop(row, tokens)` (e.g. a stop string of lm-eval's generate_until) says so; the
predicate is asked every `check_every` tokens, so a row may run up to that many tokens past the
point it names, which the caller trims. Decoding runs as a jitted loop on the device between checks.
Prompt and output lengths are rounded up (`length_multiple`) so few shapes are compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plamo_jax.errors import DataError
from plamo_jax.evaluate.batching import batch_shard_count, round_up
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train.run import ModelRun

StopPredicate = Callable[[int, list[int]], bool]


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


def sample_next(logits_V: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """Greedy at temperature <= 0; otherwise nucleus sampling over the smallest set with mass >= top_p.

    temperature and top_p may be traced: one compiled program serves greedy and sampled decoding (a
    `cond`, so greedy decoding never sorts the vocabulary).
    """
    temperature = jnp.asarray(temperature, jnp.float32)

    def nucleus(logits_V):
        log_probs = jax.nn.log_softmax(logits_V.astype(jnp.float32) / temperature)
        order = jnp.argsort(-log_probs)
        cumulative = jnp.cumsum(jnp.exp(log_probs[order]))
        keep_sorted = cumulative - jnp.exp(log_probs[order]) < top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
        return jax.random.categorical(key, jnp.where(keep, log_probs, -jnp.inf)).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, nucleus, lambda logits_V: jnp.argmax(logits_V).astype(jnp.int32),
                        logits_V)


class DecodeState(NamedTuple):
    carry: Any  # the KV cache (cached) or the token buffer [B, S] (cache-free)
    logits_BV: jax.Array  # logits of each row's next token
    column: jax.Array  # the column the next token goes to (shared by all rows)
    done_B: jax.Array
    count_B: jax.Array  # tokens generated per row
    out_BN: jax.Array  # generated tokens, row b's first count_B[b] are real
    key: jax.Array


# -- device programs: module-level and keyed by the (hashable) graphdef, so every Generator of one model
# -- shares its compiled programs


def _full_logits(model, tokens_BS, positions_BS, valid_BS):
    logits, _ = model(tokens_BS, valid_BS.astype(jnp.int32), positions_BS)  # padding is segment 0
    return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "cached", "prompt_columns"))
def _start(params, tokens_BS, positions_BS, valid_BS, *, graphdef, cached: bool, prompt_columns: int):
    """Run the prompts: (cache or buffer, logits of each row's first new token)."""
    model = nnx.merge(graphdef, params)
    if not cached:
        return tokens_BS, _full_logits(model, tokens_BS, positions_BS, valid_BS)[:, prompt_columns - 1]
    batch, columns = tokens_BS.shape
    prompt = slice(0, prompt_columns)
    cache = model.init_cache(batch, columns)
    logits, cache = model.extend(tokens_BS[:, prompt], positions_BS[:, prompt], 0, cache, valid_BS)
    return cache, logits[:, -1]


def _feed(model, cached: bool, carry, token_B, column, positions_BS, valid_BS):
    """Write one token per row at `column`: (new carry, logits of the token after it)."""
    if cached:
        positions_B1 = jax.lax.dynamic_slice_in_dim(positions_BS, column, 1, axis=1)
        logits, carry = model.extend(token_B[:, None], positions_B1, column, carry, valid_BS)
        return carry, logits[:, 0]
    tokens_BS = jax.lax.dynamic_update_slice_in_dim(carry, token_B[:, None], column, axis=1)
    logits = _full_logits(model, tokens_BS, positions_BS, valid_BS)
    return tokens_BS, jax.lax.dynamic_index_in_dim(logits, column, axis=1, keepdims=False)


@functools.partial(jax.jit, static_argnames=("graphdef", "cached", "pad_id"), donate_argnums=(1,))
def _decode(params, state: DecodeState, positions_BS, valid_BS, max_new_B, steps, temperature, top_p, stops_K,
            *, graphdef, cached: bool, pad_id: int) -> DecodeState:
    """Up to `steps` tokens per row, stopping early when every row is done; stops_K: stop ids (-1 = none)."""
    batch = state.done_B.shape[0]
    rows = jnp.arange(batch)
    sample = jax.vmap(lambda logits, key: sample_next(logits, key, temperature, top_p))

    def body(loop):
        # The parameters ride in the loop state: NNX modules must be merged at the loop's own level.
        step, state, params = loop
        model = nnx.merge(graphdef, params)
        keys = jax.random.split(jax.random.fold_in(state.key, state.column), batch)
        token_B = sample(state.logits_BV, keys).astype(jnp.int32)
        live_B = ~state.done_B
        token_B = jnp.where(live_B, token_B, pad_id)
        # a finished row writes past the end of its output, which drops the write
        write_at_B = jnp.where(live_B, state.count_B, state.out_BN.shape[1])
        out_BN = state.out_BN.at[rows, write_at_B].set(token_B, mode="drop")
        count_B = state.count_B + live_B
        stopped_B = live_B & jnp.any(token_B[:, None] == stops_K[None, :], axis=1)
        done_B = state.done_B | stopped_B | (count_B >= max_new_B)
        carry, logits_BV = _feed(model, cached, state.carry, token_B, state.column, positions_BS, valid_BS)
        column = state.column + 1
        return step + 1, DecodeState(carry, logits_BV, column, done_B, count_B, out_BN, state.key), params

    def cond(loop):
        step, state, _ = loop
        return (step < steps) & ~jnp.all(state.done_B)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state, params))[1]


def _stop_array(stop_ids: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a multiple of 8 entries (few compiled shapes)."""
    stops = np.full(round_up(max(1, len(stop_ids)), 8), -1, np.int32)
    stops[: len(stop_ids)] = stop_ids
    return stops


class Generator:
    """Generation with one model's parameters.

    cached: decode through the family's KV cache (FamilySpec.cached_decoding) or re-run the buffer.
    batch_multiple: rows are padded to a multiple of this (the batch sharding's shard count).
    """

    def __init__(self, graphdef: nnx.GraphDef, params: Any, *, cached: bool, pad_id: int = 0,
                 batch_multiple: int = 1, length_multiple: int = 32, mesh=None, rules=None):
        self.graphdef, self.params = graphdef, params
        self.cached = cached
        self.pad_id = pad_id
        self.batch_multiple = batch_multiple
        self.length_multiple = length_multiple
        self.mesh, self.rules = mesh, rules

    # -- the host side -----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int] | np.ndarray], *, max_new_tokens: int | Sequence[int],
                 stop_ids: Sequence[int] = (), stop: StopPredicate | None = None, check_every: int = 16,
                 sampling: Sampling = Sampling()) -> list[list[int]]:
        """The tokens generated after each prompt (a stop id included), one list per prompt."""
        count = len(prompts)
        limits = [max_new_tokens] * count if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != count:
            raise ValueError(f"{len(limits)} max_new_tokens for {count} prompts")
        if count == 0:
            return []
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise DataError(f"prompt {index} has no tokens; expected at least one (e.g. BOS)")
        layout = _Layout(prompts, limits, self.batch_multiple, self.length_multiple, self.pad_id)
        steps = layout.new_columns if stop is None else max(1, check_every)
        arrays = (layout.positions, layout.valid)
        stops = _stop_array(stop_ids)
        with sharding_context(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext():
            carry, logits = _start(self.params, layout.tokens, *arrays, graphdef=self.graphdef,
                                   cached=self.cached, prompt_columns=layout.prompt_columns)
            state = layout.first_state(carry, logits, sampling.seed)
            while True:
                state = _decode(self.params, state, *arrays, layout.max_new, steps, sampling.temperature,
                                sampling.top_p, stops, graphdef=self.graphdef, cached=self.cached,
                                pad_id=self.pad_id)
                done = np.array(state.done_B)  # a writable copy
                if stop is not None and not done.all():
                    counts, out = np.asarray(state.count_B), np.asarray(state.out_BN)
                    newly = [row for row in range(count)
                             if not done[row] and stop(row, out[row, : counts[row]].tolist())]
                    if newly:
                        done[newly] = True
                        state = state._replace(done_B=jnp.asarray(done))
                if done.all():
                    break
        counts, out = np.asarray(state.count_B), np.asarray(state.out_BN)
        return [out[row, : counts[row]].tolist() for row in range(count)]


class _Layout:
    """Left-padded prompts in a [rows, prompt_columns + new_columns] buffer; padding rows are born done."""

    def __init__(self, prompts, limits: list[int], batch_multiple: int, length_multiple: int, pad_id: int):
        rows = round_up(len(prompts), batch_multiple)
        self.prompt_columns = round_up(max(len(p) for p in prompts), length_multiple)
        self.new_columns = round_up(max(1, max(limits)), length_multiple)
        self.pad_id = pad_id
        columns = self.prompt_columns + self.new_columns
        self.tokens = np.full((rows, columns), pad_id, np.int32)
        first_real = np.full(rows, self.prompt_columns - 1, np.int64)  # a padding row: one pad token
        for index, prompt in enumerate(prompts):
            first_real[index] = self.prompt_columns - len(prompt)
            self.tokens[index, first_real[index] : self.prompt_columns] = np.asarray(prompt, np.int32)
        column_index = np.arange(columns)[None, :]
        self.valid = column_index >= first_real[:, None]
        self.positions = np.maximum(column_index - first_real[:, None], 0).astype(np.int32)
        self.max_new = np.zeros(rows, np.int32)
        self.max_new[: len(prompts)] = limits

    def first_state(self, carry, logits_BV, seed: int) -> DecodeState:
        rows = len(self.max_new)
        out = jnp.full((rows, self.new_columns), self.pad_id, jnp.int32)
        return DecodeState(carry, logits_BV, jnp.int32(self.prompt_columns), jnp.asarray(self.max_new <= 0),
                           jnp.zeros(rows, jnp.int32), out, jax.random.key(seed))


def generator_for(run: ModelRun, params: Any, *, pad_id: int = 0, cached: bool | None = None) -> Generator:
    """A Generator on the run's mesh; the family's KV cache if it has one (cached=False re-runs buffers)."""
    use_cache = run.family.cached_decoding if cached is None else cached
    return Generator(run.setup.graphdef, params, cached=use_cache, pad_id=pad_id,
                     batch_multiple=batch_shard_count(run), mesh=run.mesh, rules=run.rules)


def generate(graphdef: nnx.GraphDef, params, prompt_ids: np.ndarray, *, max_new_tokens: int,
             stop_ids: tuple[int, ...] = (), temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             cached: bool = False) -> list[int]:
    """Tokens generated after one prompt, stopping after a stop id or `max_new_tokens` (no mesh)."""
    generator = Generator(graphdef, params, cached=cached)
    return generator.generate([prompt_ids], max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                              sampling=Sampling(temperature, top_p, seed))[0]
