"""Held-out loss of a checkpoint: cross entropy, perplexity and bits per UTF-8 byte, per corpus.

Every document of a corpus is scored exactly once: the ordinary pipeline reads it unshuffled with
`pad` packing (each document starts a row; a long one continues in the next rows, whose first
token then has no earlier context), and rows past the end of the epoch in the last batch are
masked out. Bits per byte divides by the corpus's text bytes, so models with different tokenizers
compare on one scale.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from plamo_jax.data.pipeline import parse_sources
from plamo_jax.errors import DataError
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import state as state_lib
from plamo_jax.train.metrics import Progress
from plamo_jax.train.objectives.lm import CORPUS_FORMATS, LANGUAGE_MODELING, lm_loss_sums
from plamo_jax.train.run import ModelRun


@dataclasses.dataclass
class CorpusScore:
    source: str
    documents: int
    tokens: int
    nats: float
    text_bytes: int

    def to_dict(self) -> dict:
        cross_entropy = self.nats / max(self.tokens, 1)
        return {
            "source": self.source,
            "documents": self.documents,
            "tokens": self.tokens,
            "cross_entropy": cross_entropy,
            "perplexity": math.exp(cross_entropy),
            "bits_per_byte": self.nats / math.log(2) / self.text_bytes if self.text_bytes else None,
        }


def jit_loss_sums(run: ModelRun):
    """(params, batch) -> summed cross entropy and token count, jitted with the mesh shardings."""

    def sums(params, batch):
        _, totals = lm_loss_sums(run.setup.graphdef, params, batch, run.config.model, z_loss=0.0)
        return totals["cross_entropy"], totals["tokens"]

    return jax.jit(sums, in_shardings=(run.setup.param_shardings, run.batch_sharding))


def evaluate_perplexity(
    run: ModelRun,
    params,
    sources: str,
    *,
    seq_len: int,
    batch_size: int,
    data_format: str = "text",
) -> list[dict]:
    """One score per entry of `sources` (data.source syntax, weights ignored).

    data_format: `text` scores every token; `chat` scores what the assistant says (data.chat_template).
    """
    if data_format not in CORPUS_FORMATS:
        raise DataError(f"perplexity data format {data_format!r}; expected one of {tuple(CORPUS_FORMATS)}")
    loss_sums = jit_loss_sums(run)
    batch_sharding = run.batch_sharding
    results = []
    for spec in parse_sources(sources):
        data_config = run.config.data.copy_and_resolve_references()
        data_config.update(source=spec.path, shuffle=False, shuffle_rows=False, packing="pad",
                           format=data_format)
        data = LANGUAGE_MODELING.make_iterator(
            data_config,
            seq_len=seq_len,
            global_batch_size=batch_size,
            seed=0,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        rows = int(data.rows.packed[0].rows_per_epoch)
        nats, tokens = 0.0, 0
        steps = math.ceil(rows / batch_size)
        progress = Progress(0, steps, enabled=jax.process_index() == 0)
        with sharding_context(run.mesh, run.rules):
            for step in range(steps):
                local = next(data)
                first_row = step * batch_size + jax.process_index() * data.local_batch_size
                beyond_epoch = first_row + np.arange(data.local_batch_size) >= rows
                local["loss_mask"][beyond_epoch] = 0
                batch = state_lib.global_batch(local, batch_sharding, batch_size)
                step_nats, step_tokens = jax.device_get(loss_sums(params, batch))
                nats += float(step_nats)
                tokens += int(step_tokens)
                progress.update(1, corpus=spec.path, loss=f"{nats / max(tokens, 1):.4f}")
        progress.close()
        data.close()
        corpus = data.corpora[0]
        documents, text_bytes = corpus.documents.num_documents, corpus.read_report.text_bytes
        results.append(CorpusScore(spec.path, documents, tokens, nats, text_bytes).to_dict())
    return results
