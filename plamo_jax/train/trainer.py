"""The training loop: build the run, choose the initial state, step, watch the guards, checkpoint.

    train(config) -> TrainResult

The run (mesh, model, objective, jitted step) comes from `train/run.py`; the initial state is the
newest readable checkpoint in train.output_dir, else checkpoint.init_params (or what the objective
starts from), else a fresh initialisation. The step skips bad updates itself (train/guards.py); the
loop reads the guard's counts at every log interval: it vouches for checkpoints that a later healthy
step confirmed, never saves a state whose last step was skipped, rewinds to the newest vouched-for
checkpoint after train.rewind_after skipped steps in a row, and stops (exit status 3) after
train.max_bad_steps.
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

from plamo_jax.errors import ConfigError, TrainingDiverged
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import guards
from plamo_jax.train import state as state_lib
from plamo_jax.train.checkpoint import Checkpointer, carry_assets
from plamo_jax.train.continuation import check_sources, checkpoint_directory, load_init_params
from plamo_jax.train.goodput import Goodput
from plamo_jax.train.metrics import MetricsWriter, Progress, flatten_metrics
from plamo_jax.train.peak_flops import peak_flops
from plamo_jax.train.run import Run, build_run

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    final_step: int
    last_metrics: dict[str, float]
    preempted: bool
    state: dict
    goodput: str = ""


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
        restored = checkpointer.restore_latest(run.abstract_state(), accept_data=data.set_state,
                                               defaults={"guard": run.fresh_guard()})
        if restored is not None:
            return restored[0]
    params = run.objective.start_params(frozen) if frozen is not None else None
    if params is None and config.checkpoint.init_params:
        # Continual pre-training / SFT: parameters from a converted, upcycled or pruned checkpoint.
        params = load_init_params(config, run.setup)
    if params is not None:
        log.info("initialised parameters from %s", config.checkpoint.init_params)
        if checkpointer is not None and carry_assets(config.checkpoint.init_params, checkpointer.directory):
            log.info("kept the imported model's config, generation config and tokenizer (hf_assets) "
                     "with this run's checkpoints for export")
    return run.fresh_state(params)


class MetricsLog:
    """Device metrics kept per step and fetched every log interval: TensorBoard / JSONL, progress bar.

    MFU is shown only against a configured, vendor or measured peak (train/peak_flops.py).
    """

    def __init__(self, run: Run, data, start_step: int, goodput: Goodput):
        config = run.config
        is_main = jax.process_index() == 0
        self.data = data
        self.goodput = goodput
        self.tokens_at = run.tokens_at
        self.flops_per_token = run.flops_per_token
        self.peak = peak_flops(config.train.peak_flops_per_device, config.model,
                               calibrate=bool(config.train.calibrate_peak_flops))
        if is_main:
            unknown = (f"nothing: no peak is known for {jax.devices()[0].device_kind} (set "
                       "train.peak_flops_per_device or train.calibrate_peak_flops)")
            log.info("MFU against %s", self.peak.describe() if self.peak else unknown)
        self.writer = MetricsWriter(config.train.output_dir, enabled=is_main, start_step=start_step)
        if self.writer.superseded:
            log.info("metrics.jsonl: moved %d lines of steps after %d (an earlier attempt's) to "
                     "metrics.superseded.jsonl", len(self.writer.superseded), start_step)
        self.progress = Progress(start_step, config.train.steps, enabled=is_main)
        self.pending: list[tuple[int, dict]] = []
        self.last: dict[str, float] = {}
        self.step_seconds = 0.0
        self._interval_start = time.perf_counter()

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """Fetch, write and show the pending steps' metrics; returns them (step, flat metrics)."""
        if not self.pending:
            return []
        fetched = [flatten_metrics(values) for values in jax.device_get([m for _, m in self.pending])]
        elapsed = time.perf_counter() - self._interval_start
        self.step_seconds = elapsed / len(self.pending)
        tokens_per_second = sum(self.tokens_at(step - 1) for step, _ in self.pending) / elapsed
        interval = {"perf/tokens_per_second": tokens_per_second, "perf/step_seconds": self.step_seconds,
                    **data_metrics(self.data), **self.goodput.interval_metrics()}
        if self.peak:
            interval["perf/mfu"] = tokens_per_second * self.flops_per_token / (
                jax.device_count() * self.peak.flops_per_device)
            interval["perf/peak_flops_per_device"] = self.peak.flops_per_device
        records = [(step, values) for (step, _), values in zip(self.pending, fetched, strict=True)]
        for step, values in records:
            self.writer.write(step, values | (interval if step == records[-1][0] else {}))
        self.last = records[-1][1]
        shown = {"loss": f"{self.last['loss']:.4f}", "tok_s": f"{tokens_per_second:,.0f}"}
        if self.peak:
            shown["mfu"] = f"{interval['perf/mfu']:.1%}"
        if self.last.get("guard/skipped"):
            shown["skipped"] = str(int(self.last["guard/skipped"]))
        self.progress.update(len(self.pending), **shown)
        self.pending.clear()
        self._interval_start = time.perf_counter()
        return records

    def restart_at(self, step: int) -> None:
        self.pending.clear()
        self.writer.restart_at(step)
        self.progress.reset(step)

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
    shard, shards = run.data_shard
    data = run.objective.make_iterator(config.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                                       seed=t.seed, process_index=shard, process_count=shards,
                                       batch_sizes=run.global_batch_at if run.ramp is not None else None)
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
        return Training(run, data, checkpointer).loop()
    finally:
        if checkpointer is not None:
            checkpointer.wait_until_finished()
            checkpointer.close()
        data.close()


def lost_seconds(superseded: list[dict]) -> float:
    """Wall time of an earlier attempt's steps that are run again: their count x that attempt's step time."""
    step_times = [record["perf/step_seconds"] for record in superseded if "perf/step_seconds" in record]
    return len(superseded) * float(np.mean(step_times)) if step_times else 0.0


def describe_skips(records: list[tuple[int, dict[str, float]]]) -> list[str]:
    """'step 45 (loss spike)' for every skipped step of a log interval."""
    return [f"step {step} ({guards.REASONS.get(int(values['guard/skip_reason']), '?')}, loss "
            f"{values['loss']:.4g}, grad norm {values['grad_norm']:.4g})"
            for step, values in records if values.get("guard/skip_reason", 0)]


class Training:
    """One run of the loop: the state, the data, the checkpoints, the guards' decisions, goodput."""

    def __init__(self, run: Run, data, checkpointer: Checkpointer | None):
        self.run, self.data, self.checkpointer = run, data, checkpointer
        self.config = run.config
        self.goodput = Goodput()
        with self.goodput.timing("initial_state"):
            self.frozen = run.load_frozen()  # e.g. DPO's reference, read once
            self.state = initial_state(run, checkpointer, data, self.frozen)
        self.step = int(self.state["step"])
        self.grad_levels_taken = self.guard_count("taken")  # as of the last log interval
        self.rewinds = 0
        self.compiled_shapes: set = set()
        if jax.process_index() == 0:
            log_run_summary(run)
        self.metrics = MetricsLog(run, data, self.step, self.goodput)
        # The steps a crashed attempt ran after its last checkpoint are run again: time lost to it.
        self.goodput.add("restart_lost", lost_seconds(self.metrics.writer.superseded))

    def loop(self) -> TrainResult:
        steps, preempted = self.config.train.steps, False
        try:
            with PreemptionFlag() as preemption, sharding_context(self.run.mesh, self.run.rules):
                while self.step < steps:
                    self.one_step()
                    if self.step % self.config.train.log_every == 0 or self.step == steps:
                        self.watch(self.metrics.flush())
                    stop = preemption.agreed()
                    self.maybe_save(force=stop or self.step == steps)
                    if stop:
                        preempted = True
                        break
            self.watch(self.metrics.flush())
        finally:
            self.metrics.close()  # also when the guards stop the run: the metrics so far are kept
        if self.checkpointer is not None:
            with self.goodput.timing("checkpoint"):
                self.checkpointer.wait_until_finished()
        summary = self.goodput.summary()
        if jax.process_index() == 0:
            log.info("finished at step %d: %s", self.step, summary)
        return TrainResult(self.step, self.metrics.last, preempted, self.state, summary)

    def one_step(self) -> None:
        with self.goodput.timing("data"):
            local = next(self.data)
            size = self.run.global_batch_at(self.step)
            batch = state_lib.global_batch(local, self.run.batch_sharding, size)
        shape = tuple(next(iter(batch.values())).shape)
        if shape in self.compiled_shapes:
            self.state, step_metrics = self.run.step(self.state, batch, self.frozen)
        else:  # the first call of a shape traces and compiles before it dispatches
            with self.goodput.timing("compile"):
                self.state, step_metrics = self.run.step(self.state, batch, self.frozen)
            self.compiled_shapes.add(shape)
        self.step += 1
        self.metrics.add(self.step, step_metrics)

    def maybe_save(self, force: bool) -> None:
        if self.checkpointer is None or not (force or self.checkpointer.should_save(self.step)):
            return
        bad_in_a_row = self.guard_count("bad_in_a_row")
        if bad_in_a_row:
            log.warning("step %d: not saved: the last %d step(s) were skipped by the guard, so these "
                        "parameters are not known to be good", self.step, bad_in_a_row)
            return
        with self.goodput.timing("checkpoint"):
            saved = self.checkpointer.maybe_save(self.step, self.state, self.data.get_state(),
                                                 self.config.to_json(), force=True)
        if saved:
            self.watch(self.metrics.flush())

    def guard_count(self, name: str) -> int:
        return int(jax.device_get(self.state["guard"][name]))

    def watch(self, records: list[tuple[int, dict[str, float]]]) -> None:
        """The guard's view of the steps just fetched: vouch, warn, rewind or stop."""
        if not records:
            return
        t = self.config.train
        healthy = [step for step, values in records if not values.get("guard/skip_reason", 0)]
        if healthy and self.checkpointer is not None:
            with self.goodput.timing("checkpoint"):
                self.checkpointer.vouch(max(healthy))
        skipped = describe_skips(records)
        if skipped and jax.process_index() == 0:
            log.warning("guard skipped %d update(s): %s", len(skipped), "; ".join(skipped[:5]))
        taken = int(records[-1][1].get("guard/grad_levels_taken", 0))
        if taken > self.grad_levels_taken and jax.process_index() == 0:
            log.warning("guard: a gradient-norm spike with a normal loss outlasted train.spike_patience=%d "
                        "skipped steps: taken as the new gradient-norm level (%d so far, last by step %d)",
                        t.spike_patience, taken, records[-1][0])
        self.grad_levels_taken = taken
        bad_in_a_row = int(records[-1][1].get("guard/bad_in_a_row", 0))
        if bad_in_a_row >= t.max_bad_steps:
            raise TrainingDiverged(
                f"train.max_bad_steps={t.max_bad_steps}: the last {bad_in_a_row} steps were all skipped "
                f"(last: {skipped[-1] if skipped else records[-1][0]}); {self.good_checkpoint_note()}")
        if t.rewind_after and bad_in_a_row >= t.rewind_after:
            self.rewind(bad_in_a_row)

    def good_checkpoint_note(self) -> str:
        vouched = self.checkpointer.vouched_steps() if self.checkpointer is not None else []
        if not vouched:
            return "no checkpoint is known to be good"
        return (f"the newest good checkpoint is step {vouched[-1]} in {self.checkpointer.directory} "
                "(restart from it with a lower optimizer.learning_rate, or set train.rewind_after)")

    def rewind(self, bad_in_a_row: int) -> None:
        """Back to the newest vouched-for checkpoint, skipping train.rewind_skip_batches batches after it."""
        t = self.config.train
        vouched = self.checkpointer.vouched_steps() if self.checkpointer is not None else []
        if not vouched or self.rewinds >= t.max_rewinds:
            why = f"train.max_rewinds={t.max_rewinds} reached" if vouched else "no good checkpoint"
            raise TrainingDiverged(f"train.rewind_after={t.rewind_after}: {bad_in_a_row} steps in a row were "
                                   f"skipped after {self.rewinds} rewind(s), {why}; "
                                   f"{self.good_checkpoint_note()}")
        target = vouched[-1]
        discarded = self.step - target
        with self.goodput.timing("rewound"):
            self.checkpointer.wait_until_finished()
            self.checkpointer.set_aside_after(target)  # unvouched, and its steps will be written again
            self.state, data_state = self.checkpointer.restore_latest(
                self.run.abstract_state(), before=target + 1, defaults={"guard": self.run.fresh_guard()})
            skip_rows = t.rewind_skip_batches * self.run.global_batch_at(int(self.state["step"]))
            first = int(data_state["rows_consumed"])
            self.data.set_state(dict(data_state, rows_consumed=first + skip_rows))
        self.goodput.add("rewound", discarded * self.metrics.step_seconds)
        self.rewinds += 1
        self.step = int(self.state["step"])
        self.grad_levels_taken = self.guard_count("taken")
        self.metrics.restart_at(self.step)
        log.warning("rewind %d of at most %d: %d steps in a row were skipped; back to step %d, skipping "
                    "the %d batches after it (global rows %d to %d)", self.rewinds, t.max_rewinds,
                    bad_in_a_row, self.step, t.rewind_skip_batches, first, first + skip_rows - 1)
