"""Log-likelihood of continuations: sum of log p(token | everything before it) and whether greedy decoding
would have produced them, for many (tokens, scored suffix) sequences in sharded batches.

Each sequence is one packed row (one document, no padding inside); rows are grouped by length
(rounded up to `length_multiple`, so few shapes compile) into batches of `batch_size` rows laid out
like training batches (every process builds all rows and passes its slice), and the scores are
gathered back to every process in the original order.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from plamo_jax.data import batch as batch_layout
from plamo_jax.data.packing import row_arrays
from plamo_jax.errors import ConfigError
from plamo_jax.evaluate.batching import batch_shard_count, round_up
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import state as state_lib
from plamo_jax.train.run import ModelRun
from plamo_jax.train.step import forward


@dataclasses.dataclass(frozen=True)
class Scored:
    log_prob: float  # sum over the scored tokens
    greedy: bool  # every scored token is the argmax of its prediction


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_batch(params, batch, *, graphdef) -> tuple[jax.Array, jax.Array]:
    """Per row: summed log-probability of the loss-masked targets, and whether each is the argmax.

    Jitted once per model (graphdef) and shapes; the inputs' shardings (parameters, batch) lay it out.
    """
    logits, _ = forward(graphdef, params, batch)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = batch["target_ids"]
    token_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    scored = batch["loss_mask"] > 0
    sums = jnp.sum(jnp.where(scored, token_log_probs, 0.0), axis=-1)
    greedy = jnp.all(~scored | (jnp.argmax(logits, axis=-1) == targets), axis=-1)
    return sums, greedy


class ContinuationScorer:
    """score([(tokens, n)]) -> the log-likelihood of the last n tokens of each given the ones before."""

    def __init__(self, run: ModelRun, params: Any, *, batch_size: int, pad_id: int,
                 length_multiple: int = 64):
        if batch_size % batch_shard_count(run):
            raise ConfigError(f"batch size {batch_size}: expected a multiple of the {batch_shard_count(run)} "
                              "devices the batch is split over")
        self.run, self.params = run, params
        self.batch_size, self.pad_id, self.length_multiple = batch_size, pad_id, length_multiple

    def score(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[Scored]:
        results: list[Scored | None] = [None] * len(sequences)
        by_length: dict[int, list[int]] = {}
        for index, (tokens, scored) in enumerate(sequences):
            if not 1 <= scored <= len(tokens) - 1:
                raise ValueError(f"sequence {index}: {scored} scored tokens of {len(tokens)}; expected 1 to "
                                 "len(tokens) - 1 (the first token has nothing to be predicted from)")
            length = round_up(len(tokens) - 1, self.length_multiple)
            by_length.setdefault(length, []).append(index)
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                rows = [self._row(sequences[i], length) for i in chunk]
                rows += [batch_layout.empty_row(length, self.pad_id)] * (self.batch_size - len(rows))
                sums, greedy = self._run(rows)
                for offset, index in enumerate(chunk):
                    results[index] = Scored(float(sums[offset]), bool(greedy[offset]))
        return results

    def _row(self, sequence: tuple[Sequence[int], int], length: int) -> dict[str, np.ndarray]:
        tokens, scored = sequence
        window = np.asarray(tokens, np.int32)
        mask = np.zeros(len(window), np.uint8)
        mask[-scored:] = 1
        return row_arrays(window, np.zeros(len(window), np.int64), length, self.pad_id, mask)

    def _run(self, rows: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        local_rows = self.batch_size // jax.process_count()
        first = jax.process_index() * local_rows
        local = {key: np.stack([row[key] for row in rows[first : first + local_rows]]) for key in rows[0]}
        with sharding_context(self.run.mesh, self.run.rules):
            batch = state_lib.global_batch(local, self.run.batch_sharding, self.batch_size)
            sums, greedy = _score_batch(self.params, batch, graphdef=self.run.setup.graphdef)
            gathered = multihost_utils.process_allgather((sums, greedy), tiled=True)
        return np.asarray(gathered[0]), np.asarray(gathered[1])
