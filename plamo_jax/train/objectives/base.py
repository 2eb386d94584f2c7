"""The objective spec: what a training objective owns, so that no caller branches on its name.

An objective owns its batch keys and iterator, its loss (as sums, so microbatches and shards add up),
the frozen parameters it holds (DPO's reference), the sequences and FLOPs each example costs, and its
metrics. The trainer, the memory estimator, ahead-of-time compilation and the evaluator build a run
through `train/run.py` and ask the objective.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import ml_collections
from flax import nnx

from plamo_jax.data import batch as batch_layout
from plamo_jax.data.pipeline import TrainIterator
from plamo_jax.errors import ConfigError
from plamo_jax.train.state import ModelSetup

Config = ml_collections.ConfigDict
Batch = dict[str, jax.Array]


class Objective(abc.ABC):
    """One training objective; a subclass is registered in `train/objectives/__init__.py`.

    name: the value of train.objective.
    data_formats: the data.format values it trains on.
    sequence_prefixes: one batch-key prefix per sequence of an example ("" = the plain fields).
    normalizer: the metric sum that gradients are divided by (tokens, pairs).
    flops_factor: model FLOPs per token relative to one forward + backward pass of the policy
        (`flops_factor_of` when it depends on the config, e.g. a teacher of another size).
    frozen_copies: parameter-sized frozen copies the objective holds (for the memory estimate;
        `frozen_models` when what is held is another model).
    """

    name: ClassVar[str]
    data_formats: ClassVar[tuple[str, ...]]
    sequence_prefixes: ClassVar[tuple[str, ...]] = ("",)
    normalizer: ClassVar[str] = "tokens"
    flops_factor: ClassVar[float] = 1.0
    frozen_copies: ClassVar[int] = 0

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return batch_layout.keys(self.sequence_prefixes)

    @property
    def sequences_per_example(self) -> int:
        """Sequences of train.seq_len tokens in one row of the global batch."""
        return len(self.sequence_prefixes)

    def validate(self, config: Config) -> None:
        """ConfigError naming the key for the objective's own keys; the base checks data.format."""
        if config.data.format not in self.data_formats:
            raise ConfigError(
                f"config key data.format={config.data.format!r}: expected one of {self.data_formats} "
                f"for train.objective={self.name!r}"
            )

    @abc.abstractmethod
    def make_iterator(self, data_config: Config, *, seq_len: int, global_batch_size: int, seed: int,
                      process_index: int = 0, process_count: int = 1,
                      batch_sizes: Callable[[int], int] | None = None) -> TrainIterator:
        """This process' iterator over batches of `batch_keys`, [global_batch_size // processes, seq_len]
        (batch_sizes: step -> global batch size under a ramp)."""

    @abc.abstractmethod
    def loss_sums(self, graphdef: nnx.GraphDef, params: Any, frozen: Any, batch: Batch,
                  config: Config) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(objective sum, metric sums) of one (micro)batch; sums[normalizer] divides the gradient."""

    @abc.abstractmethod
    def metrics(self, sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The logged metrics of a step's sums; "loss" and "tokens" among them."""

    # -- frozen parameters (none by default) ------------------------------------------------------

    def check_frozen(self, config: Config) -> None:  # noqa: B027 - most objectives hold nothing frozen
        """Before anything is read: the checkpoints `load_frozen` will read exist and fit (ConfigError)."""

    def load_frozen(self, config: Config, setup: ModelSetup) -> Any:
        """The frozen parameters the step receives, read once at start, laid out on setup's mesh."""
        return None

    def abstract_frozen(self, config: Config, setup: ModelSetup) -> Any:
        """ShapeDtypeStructs (with shardings) of what `load_frozen` returns, for jit and compilation."""
        return None

    def frozen_models(self, config: Config) -> tuple[Config, ...]:
        """Model configs of the frozen parameters held, each sharded on the run's mesh (memory estimate)."""
        return (config.model,) * self.frozen_copies

    def flops_factor_of(self, config: Config) -> float:
        """Model FLOPs per token relative to one forward + backward pass of the policy, for `config`."""
        return self.flops_factor

    def start_params(self, frozen: Any) -> Any:
        """Parameters a fresh run starts from, given the frozen ones (None: random or init_params)."""
        return None
