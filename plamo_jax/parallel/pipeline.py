"""Pipeline parallelism's schedule: which stage works on which microbatch at which iteration.

The `stage` mesh axis splits the scanned blocks into S stages (the logical rule `layers -> stage`). A
batch is cut into M pipeline microbatches; every iteration each stage runs its blocks on one microbatch
and hands the result to the next stage (models/pipelined_stack.py runs it). With R repeats (the circular,
or interleaved, schedule of MaxText and Megatron's virtual stages) each stage holds R non-adjacent chunks
of K blocks and a microbatch goes round the ring R times: block b = (r * S + s) * K + k lives on stage s.

Iteration t: stage s works on pass i = t - s (microbatch i mod M, repeat i // M) when 0 <= i < R * M,
and idles otherwise. That takes R * M + S - 1 iterations for R * M useful ones per stage: the bubble is
(S - 1) / (R * M + S - 1). A microbatch leaves the last stage at iteration i + S - 1 and re-enters the
first at i + M, so the circular schedule needs M >= S. This module holds the arithmetic; it imports no
model code.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from plamo_jax.errors import ConfigError
from plamo_jax.parallel import rules as sharding_rules

STAGE_AXIS = "stage"
DATA_AXIS = "data"
SCHEDULES = ("gpipe", "circular")
# act_stage: the stage dimension of the pipeline's buffers; act_vocab: the LM head's logits, split over
# the stages so that no stage holds or computes the whole head (see the README's pipeline section).
STAGE_SHARDED_ACTIVATIONS = ("act_stage", "act_vocab")


def stage_count() -> int:
    """Devices along the `stage` axis of the active mesh (1 without one)."""
    mesh = sharding_rules.active_mesh()
    return 1 if mesh is None else mesh.shape.get(STAGE_AXIS, 1)


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    stages: int  # S
    microbatches: int  # M
    repeats: int  # R
    blocks_per_chunk: int  # K: consecutive blocks a stage runs per visit of a microbatch
    remat_iterations: bool = False

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble_fraction(self) -> float:
        """Idle share of each stage's iterations: (S - 1) / (R * M + S - 1)."""
        return (self.stages - 1) / self.iterations

    @property
    def num_blocks(self) -> int:
        return self.stages * self.repeats * self.blocks_per_chunk

    def stage_major_order(self) -> np.ndarray:
        """int [num_blocks]: the canonical block index at each position of the stage-major layout.

        Reshaping the blocks taken in this order to [S, R, K] gives stage s, repeat r, block k at
        [s, r, k] (canonical block (r * S + s) * K + k). For R = 1 this is the identity: contiguous
        sharding of the blocks over `stage` already puts each stage's blocks on its devices.
        """
        s, r, k = np.meshgrid(np.arange(self.stages), np.arange(self.repeats),
                              np.arange(self.blocks_per_chunk), indexing="ij")
        return ((r * self.stages + s) * self.blocks_per_chunk + k).reshape(-1)


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """The model's pipeline keys; the stage count comes from the mesh."""

    schedule: str = "gpipe"
    repeats: int = 1
    microbatches: int = 0  # 0 = as many as stages
    remat_iterations: bool = False  # checkpoint each iteration too (models/pipelined_stack.py)

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict) -> PipelineSettings:
        return cls(model_cfg.pipeline_schedule, int(model_cfg.pipeline_repeats),
                   int(model_cfg.pipeline_microbatches), bool(model_cfg.pipeline_remat_iterations))

    def plan(self, num_blocks: int, stages: int, num_layers: int) -> PipelinePlan:
        """The schedule of `num_blocks` scanned blocks over `stages`; ConfigError naming the key."""
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"config key model.pipeline_schedule={self.schedule!r}: "
                              f"expected one of {SCHEDULES}")
        if self.repeats < 1 or (self.schedule == "gpipe" and self.repeats != 1):
            raise ConfigError(f"config key model.pipeline_repeats={self.repeats}: expected "
                              + ("1 for model.pipeline_schedule='gpipe' (repeats need 'circular')"
                                 if self.repeats >= 1 else "an integer >= 1"))
        microbatches = self.microbatches or stages
        if microbatches < stages:
            raise ConfigError(f"config key model.pipeline_microbatches={microbatches}: expected at least the "
                              f"{stages} pipeline stages (mesh.stage x mesh.dcn_stage), or 0 for as many")
        if num_blocks % (stages * self.repeats):
            raise ConfigError(
                f"config key model.num_layers={num_layers}: its {num_blocks} scanned blocks are not "
                f"divisible by stages x repeats = {stages} x {self.repeats} "
                "(mesh.stage, model.pipeline_repeats)")
        return PipelinePlan(stages, microbatches, self.repeats, num_blocks // (stages * self.repeats),
                            self.remat_iterations)


def data_copies(mesh_shape: dict[str, int], rules: sharding_rules.Rules, rows_independent: bool,
                microbatch_rows: int) -> int:
    """How many copies of the stage weights, one per shard of the `data` axis, the loop runs with.

    A weight that the data shards share gets its gradient reduced over them where it is computed: in
    the loop, once per iteration (XLA does not move the reduction out). With one copy per data shard
    (their dimension sharded over `data`, each shard's rows under a `vmap` over it) every copy's gradient
    stays local through the loop, and the one reduction is the transpose of the broadcast, after it.
    Only for families whose blocks treat rows independently (MoE routes over the whole token set), when
    `data` leads the batch rule and splits a microbatch's rows evenly.
    """
    shards = mesh_shape.get(DATA_AXIS, 1)
    batch_axes = rules.get("act_batch") or ()
    if not rows_independent or shards == 1 or not batch_axes or batch_axes[0] != DATA_AXIS:
        return 1
    return shards if microbatch_rows % shards == 0 else 1


def validate_rules(rules: sharding_rules.Rules, stages: int) -> None:
    """With stages > 1 the scanned blocks must be sharded over `stage`, and no activation may be."""
    if stages == 1:
        return
    if STAGE_AXIS not in (rules.get("layers") or ()):
        raise ConfigError(f"config key mesh.rules.layers={','.join(rules.get('layers') or ())!r}: expected "
                          f"it to contain {STAGE_AXIS!r} when mesh.stage > 1 (each stage holds its blocks)")
    for name, axes in rules.items():
        if name.startswith("act_") and name not in STAGE_SHARDED_ACTIVATIONS and STAGE_AXIS in (axes or ()):
            raise ConfigError(f"config key mesh.rules.{name}={','.join(axes)!r}: the {STAGE_AXIS!r} axis "
                              "carries pipeline stages; expected activations not to be sharded over it")
