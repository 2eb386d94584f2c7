"""Language modelling: next-token cross entropy + PaLM z-loss + the family's auxiliary losses.

Pre-training reads `text` corpora; SFT reads `chat` conversations (only the assistant's tokens are
learned, by their loss mask); a run may mix both (`chat:` / `text:` prefixes on data.source).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from plamo_jax.data.formats import TEXT
from plamo_jax.data.pipeline import TrainIterator
from plamo_jax.parallel import context
from plamo_jax.posttrain.sft import CHAT
from plamo_jax.train.losses import chunked_cross_entropy_sums, cross_entropy_sums
from plamo_jax.train.objectives.base import Batch, Config, Objective
from plamo_jax.train.step import MAX_PREFIX, add_auxiliary_losses, add_statistics, forward

CORPUS_FORMATS = {TEXT.name: TEXT, CHAT.name: CHAT}


def lm_loss_sums(graphdef: nnx.GraphDef, params: Any, batch: Batch, model_cfg: ml_collections.ConfigDict,
                 z_loss: float, loss_chunk: int = 0) -> tuple[jax.Array, dict]:
    """(objective sum, metric sums) of one batch: cross entropy + z-loss + auxiliary losses, as sums.

    loss_chunk > 0: the LM head and the loss run `loss_chunk` positions at a time
    (`chunked_cross_entropy_sums`), except under sequence parallelism (the positions are sharded there).
    """
    if loss_chunk and context.sequence_shards() == 1 and batch["target_ids"].shape[1] > loss_chunk:
        model = nnx.merge(graphdef, params)
        x, aux = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"])
        sums, largest = chunked_cross_entropy_sums(model.head(), model.final_norm(x), batch["target_ids"],
                                                   batch["loss_mask"], z_loss, loss_chunk)
    else:
        logits, aux = forward(graphdef, params, batch)
        sums = cross_entropy_sums(logits, batch["target_ids"], batch["loss_mask"], z_loss)
        largest = jnp.max(jax.lax.stop_gradient(logits))
    objective = add_auxiliary_losses(sums["cross_entropy"] + sums["z_loss"], sums, aux, model_cfg,
                                     sums["tokens"])
    add_statistics(sums, aux, sums["tokens"])
    sums[MAX_PREFIX + "output_logit"] = largest
    return objective, sums


class LanguageModeling(Objective):
    name = "lm"
    data_formats = tuple(CORPUS_FORMATS)

    def make_iterator(self, data_config: Config, *, seq_len: int, global_batch_size: int, seed: int,
                      process_index: int = 0, process_count: int = 1, batch_sizes=None) -> TrainIterator:
        return TrainIterator(data_config, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                             process_index=process_index, process_count=process_count,
                             formats=CORPUS_FORMATS, batch_sizes=batch_sizes)

    def loss_sums(self, graphdef, params, frozen, batch, config):
        del frozen
        return lm_loss_sums(graphdef, params, batch, config.model, config.train.z_loss,
                            config.train.loss_chunk)

    def metrics(self, sums):
        tokens = jnp.maximum(sums["tokens"], 1.0)
        metrics = {
            "loss": (sums["cross_entropy"] + sums["z_loss"]) / tokens,
            "cross_entropy": sums["cross_entropy"] / tokens,
            "z_loss": sums["z_loss"] / tokens,
            "accuracy": sums["correct"] / tokens,
            "tokens": sums["tokens"],
        }
        for name, value in sums.items():
            if name not in metrics and name != "correct":
                metrics[name] = value if name.startswith(MAX_PREFIX) else value / tokens
        return metrics


LANGUAGE_MODELING = LanguageModeling()
