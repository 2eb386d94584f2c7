"""The training loop: build the run, choose the initial state, step, log metrics, checkpoint, stop cleanly.

    train(config) -> TrainResult

The run (mesh, model, objective, jitted step) comes from `train/run.py`; the initial state is the
newest readable checkpoint in train.output_dir, else checkpoint.init_params (or what the objective
starts from), else a fresh initialisation.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from plamo_jax.errors import ConfigError
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import flops as flops_lib
from plamo_jax.train import state as state_lib
from plamo_jax.train.checkpoint import Checkpointer
from plamo_jax.train.continuation import check_sources, checkpoint_directory, load_init_params
from plamo_jax.train.metrics import MetricsWriter, Progress, flatten_metrics
from plamo_jax.train.run import Run, build_run

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    final_step: int
    last_metrics: dict[str, float]
    preempted: bool
    state: dict


class PreemptionFlag:
    """SIGTERM / SIGINT (SLURM and TPU-VM preemption) request a final checkpoint and a clean exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("received signal %s: saving a checkpoint and stopping", signal.Signals(signum).name)
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process was signalled; every host must stop (and save) at the same step."""
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.asarray(self.requested)).any())

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def log_data_summary(data) -> None:
    """What the pipeline read: documents and tokens per corpus, and every skipped record by reason."""
    for corpus in data.stats()["corpora"]:
        report = corpus["read_report"]
        log.info(
            "data %s (weight %g): %d documents, %d tokens per epoch",
            corpus["source"],
            corpus["weight"],
            corpus["documents"],
            corpus["tokens_per_epoch"],
        )
        if corpus["truncated_documents"]:
            log.warning(
                "data %s: %d documents are longer than train.seq_len + 1 and are cut (data.packing=fit)",
                corpus["source"],
                corpus["truncated_documents"],
            )
        if report.get("skipped"):
            log.warning(
                "data %s: skipped bad input %s (first: %s); data.on_bad_input=fail stops instead",
                corpus["source"],
                report["skipped"],
                report.get("examples", [])[:3],
            )


def data_metrics(data) -> dict[str, float]:
    stats = data.stats()
    shares = {f"data/token_share/{i}": share for i, share in enumerate(stats["token_share_per_corpus"])}
    return {
        "data/packing_efficiency": stats["packing_efficiency"],
        "data/loss_token_fraction": stats["loss_token_fraction"],
        **shares,
    }


def make_checkpointer(config: ml_collections.ConfigDict) -> Checkpointer | None:
    c = config.checkpoint
    if not c.enabled:
        return None
    return Checkpointer(
        checkpoint_directory(config),
        every_steps=c.every_steps,
        every_minutes=c.every_minutes,
        keep_last=c.keep_last,
        keep_every=c.keep_every,
        async_save=c.async_save,
    )


def initial_state(run: Run, checkpointer: Checkpointer | None, data, frozen) -> dict:
    """The newest readable checkpoint (data position restored too), else the objective's or
    checkpoint.init_params's parameters with a fresh optimizer, else a fresh initialisation."""
    config = run.config
    if checkpointer is not None and checkpointer.all_steps():
        restored = checkpointer.restore_latest(run.abstract_state())
        if restored is not None:
            state, data_state = restored
            data.set_state(data_state)
            return state
    params = run.objective.start_params(frozen) if frozen is not None else None
    if params is None and config.checkpoint.init_params:
        # Continual pre-training / SFT: parameters from a converted, upcycled or pruned checkpoint.
        params = load_init_params(config, run.setup)
    if params is not None:
        log.info("initialised parameters from %s", config.checkpoint.init_params)
    return run.fresh_state(params)


class MetricsLog:
    """Device metrics kept per step and fetched every log interval: TensorBoard / JSONL, progress bar."""

    def __init__(self, run: Run, data, start_step: int):
        config = run.config
        is_main = jax.process_index() == 0
        self.data = data
        self.tokens_per_step = run.tokens_per_step
        self.flops_per_token = run.flops_per_token
        self.peak = flops_lib.peak_flops_per_device(config.train.peak_flops_per_device)
        self.writer = MetricsWriter(config.train.output_dir, enabled=is_main)
        self.progress = Progress(start_step, config.train.steps, enabled=is_main)
        self.pending: list[tuple[int, dict]] = []
        self.last: dict[str, float] = {}
        self._interval_start = time.perf_counter()

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> None:
        if not self.pending:
            return
        fetched = jax.device_get([metrics for _, metrics in self.pending])
        elapsed = time.perf_counter() - self._interval_start
        tokens_per_second = len(self.pending) * self.tokens_per_step / elapsed
        interval = {"perf/tokens_per_second": tokens_per_second,
                    "perf/step_seconds": elapsed / len(self.pending), **data_metrics(self.data)}
        if self.peak:
            interval["perf/mfu"] = tokens_per_second * self.flops_per_token / (jax.device_count() * self.peak)
        for (step, _), values in zip(self.pending, fetched, strict=True):
            self.last = flatten_metrics(values)
            self.writer.write(step, self.last | (interval if step == self.pending[-1][0] else {}))
        shown = {"loss": f"{self.last['loss']:.4f}", "tok_s": f"{tokens_per_second:,.0f}"}
        if self.peak:
            shown["mfu"] = f"{interval['perf/mfu']:.1%}"
        self.progress.update(len(self.pending), **shown)
        self.pending.clear()
        self._interval_start = time.perf_counter()

    def close(self) -> None:
        self.flush()
        self.progress.close()
        self.writer.close()


def log_run_summary(run: Run) -> None:
    log.info("model: %s parameters (%s); mesh %s; %d tokens/step; %.3g FLOPs/token",
             f"{state_lib.parameter_count(run.setup.abstract_params):,}", run.family.name,
             dict(run.mesh.shape), run.tokens_per_step, run.flops_per_token)


def make_data(run: Run):
    config, t = run.config, run.config.train
    data = run.objective.make_iterator(config.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                                       seed=t.seed, process_index=jax.process_index(),
                                       process_count=jax.process_count())
    if data.tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"config key model.vocab_size={config.model.vocab_size}: expected at least the tokenizer's "
            f"vocabulary of {data.tokenizer.vocab_size} ({config.data.tokenizer})"
        )
    return data


def train(config: ml_collections.ConfigDict) -> TrainResult:
    run = build_run(config)
    run.check_process_rows()
    check_sources(config, run.objective)  # before any data is read or directory written
    data = make_data(run)
    if jax.process_index() == 0:
        log_data_summary(data)
    checkpointer = make_checkpointer(config)
    try:
        return train_loop(run, data, checkpointer)
    finally:
        if checkpointer is not None:
            checkpointer.wait_until_finished()
            checkpointer.close()
        data.close()


def train_loop(run: Run, data, checkpointer: Checkpointer | None) -> TrainResult:
    """From the initial state to train.steps or a preemption, saving as configured."""
    config = run.config
    frozen = run.load_frozen()  # e.g. DPO's reference, read once
    state = initial_state(run, checkpointer, data, frozen)
    start_step, steps = int(state["step"]), config.train.steps
    if jax.process_index() == 0:
        log_run_summary(run)
    metrics = MetricsLog(run, data, start_step)
    preempted = False
    with PreemptionFlag() as preemption, sharding_context(run.mesh, run.rules):
        for step in range(start_step, steps):
            batch = state_lib.global_batch(next(data), run.batch_sharding, config.train.global_batch_size)
            state, step_metrics = run.step(state, batch, frozen)
            metrics.add(step + 1, step_metrics)
            if (step + 1) % config.train.log_every == 0 or step + 1 == steps:
                metrics.flush()
            stop = preemption.agreed()
            if checkpointer is not None:
                force = stop or step + 1 == steps
                if checkpointer.maybe_save(step + 1, state, data.get_state(), config.to_json(), force=force):
                    metrics.flush()
            if stop:
                preempted = True
                break
    metrics.close()
    return TrainResult(int(state["step"]), metrics.last, preempted, state)
