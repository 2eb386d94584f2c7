"""The training loop: mesh, sharded state, data, jitted step, metrics, checkpoints, preemption."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from plamo_jax.configuration import ConfigError, mesh_rules, validate_config
from plamo_jax.data.pipeline import make_train_iterator, validate_data_config
from plamo_jax.parallel.mesh import make_mesh
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.train import flops as flops_lib
from plamo_jax.train import state as state_lib
from plamo_jax.train.checkpoint import Checkpointer, CheckpointError, load_params
from plamo_jax.train.checkpoint import load_config as load_checkpoint_config
from plamo_jax.train.metrics import MetricsWriter, Progress, flatten_metrics
from plamo_jax.train.optimizer import make_optimizer

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


# Model keys that decide which parameters exist and what they mean; they must match an init checkpoint.
ARCHITECTURE_KEYS = (
    "family",
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "qk_norm",
    "tie_embeddings",
    "mamba_step",
    "ssm_num_heads",
    "ssm_head_dim",
    "ssm_state_dim",
    "ssm_conv_width",
    "num_experts",
    "num_shared_experts",
    "expert_mlp_dim",
)
# Keys a continued run may change on purpose (context extension, PLaMo 2's switch to full attention).
CHANGEABLE_KEYS = ("rope_theta", "norm_eps", "attention_window", "full_attention_layers")


def check_init_params_config(config: ml_collections.ConfigDict) -> None:
    path = config.checkpoint.init_params
    try:
        saved = load_checkpoint_config(path).model
    except CheckpointError as error:
        raise ConfigError(f"config key checkpoint.init_params={path!r}: {error}") from None
    ours = config.model
    mismatched = [key for key in ARCHITECTURE_KEYS if key in saved and saved[key] != ours[key]]
    if mismatched:
        listed = ", ".join(f"model.{k}={ours[k]!r} (checkpoint: {saved[k]!r})" for k in mismatched)
        raise ConfigError(
            f"config key checkpoint.init_params={path!r}: the checkpoint's model differs in {listed}; "
            "expected the recipe to describe the same architecture"
        )
    for key in CHANGEABLE_KEYS:
        if key in saved and saved[key] != ours[key]:
            log.warning(
                "model.%s=%r differs from the init checkpoint's %r; continuing with %r",
                key,
                ours[key],
                saved[key],
                ours[key],
            )


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
        f"{config.train.output_dir}/checkpoints",
        every_steps=c.every_steps,
        every_minutes=c.every_minutes,
        keep_last=c.keep_last,
        keep_every=c.keep_every,
        async_save=c.async_save,
    )


def make_step_fn(config: ml_collections.ConfigDict, setup: state_lib.ModelSetup, optimizer, reference):
    """(state, global batch) -> (state, metrics) for train.objective (DPO: against `reference`)."""
    if config.train.objective == "dpo":
        from plamo_jax.posttrain.dpo import jit_dpo_step

        dpo_step = jit_dpo_step(config, setup, optimizer)
        return lambda state, batch: dpo_step(state, batch, reference)
    return state_lib.jit_train_step(config, setup, optimizer)


def train(config: ml_collections.ConfigDict) -> TrainResult:
    t = config.train
    validate_config(config, jax.device_count())
    validate_data_config(config.data)
    mesh = make_mesh(config.mesh)
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    optimizer = make_optimizer(config.optimizer, t.steps)
    is_main = jax.process_index() == 0
    data = make_train_iterator(
        config.data,
        seq_len=t.seq_len,
        global_batch_size=t.global_batch_size,
        seed=t.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if data.tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"config key model.vocab_size={config.model.vocab_size}: expected at least the tokenizer's "
            f"vocabulary of {data.tokenizer.vocab_size} ({config.data.tokenizer})"
        )
    if is_main:
        log_data_summary(data)
    checkpointer = make_checkpointer(config)

    reference = None  # DPO: the frozen starting parameters, read once (a fresh run copies them)
    if t.objective == "dpo":
        check_init_params_config(config)
        reference, _ = load_params(config.checkpoint.init_params, shardings=setup.param_shardings)
        log.info("DPO reference: the frozen parameters of %s", config.checkpoint.init_params)
    state = None
    if checkpointer is not None:
        restored = checkpointer.restore_latest(state_lib.abstract_state(setup, optimizer))
        if restored is not None:
            state, data_state = restored
            data.set_state(data_state)
    if state is None and config.checkpoint.init_params:
        # Continual pre-training: parameters from a converted or upcycled checkpoint, fresh optimizer.
        if reference is None:
            check_init_params_config(config)
            params, _ = load_params(config.checkpoint.init_params, shardings=setup.param_shardings)
        else:
            params = jax.tree.map(jnp.copy, reference)  # the step donates the state; the reference stays
        state = state_lib.init_state(config.model, setup, optimizer, t.seed, params=params)
        log.info("initialised parameters from %s", config.checkpoint.init_params)
    if state is None:
        state = state_lib.init_state(config.model, setup, optimizer, t.seed)
    start_step = int(state["step"])

    batch_sharding = state_lib.batch_sharding(mesh, rules)
    held = state_lib.rows_per_process(batch_sharding, t.global_batch_size, t.seq_len)
    per_process = t.global_batch_size // jax.process_count()
    if held != per_process:
        raise ConfigError(
            f"config section mesh: each process's devices hold {held} of the {t.global_batch_size} batch "
            f"rows, but each of the {jax.process_count()} processes reads {per_process}; expected the batch "
            "axes (data x fsdp x expert) to split the batch across processes"
        )
    step_fn = make_step_fn(config, setup, optimizer, reference)

    num_params = state_lib.parameter_count(setup.abstract_params)
    tokens_per_step = t.global_batch_size * t.seq_len
    flops_per_token = flops_lib.train_flops_per_token(config.model, t.seq_len)
    if t.objective == "dpo":
        # Each row is a pair (two sequences), and the reference adds a forward pass (1/3 of fwd + bwd).
        tokens_per_step *= 2
        flops_per_token *= 4 / 3
    peak = flops_lib.peak_flops_per_device(t.peak_flops_per_device)
    if is_main:
        log.info(
            "model: %s parameters; mesh %s; %d tokens/step; %.3g FLOPs/token",
            f"{num_params:,}",
            dict(mesh.shape),
            tokens_per_step,
            flops_per_token,
        )

    writer = MetricsWriter(t.output_dir, enabled=is_main)
    progress = Progress(start_step, t.steps, enabled=is_main)
    pending: list[tuple[int, dict]] = []
    last_metrics: dict[str, float] = {}
    interval_start, interval_steps = time.perf_counter(), 0
    preempted = False

    def flush_metrics() -> None:
        nonlocal last_metrics, interval_start, interval_steps
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        elapsed = time.perf_counter() - interval_start
        tokens_per_second = interval_steps * tokens_per_step / elapsed
        interval_metrics = {
            "perf/tokens_per_second": tokens_per_second,
            "perf/step_seconds": elapsed / interval_steps,
            **data_metrics(data),
        }
        if peak:
            interval_metrics["perf/mfu"] = tokens_per_second * flops_per_token / (jax.device_count() * peak)
        for (step, _), values in zip(pending, fetched, strict=True):
            last_metrics = flatten_metrics(values)
            writer.write(step, last_metrics | (interval_metrics if step == pending[-1][0] else {}))
        progress.update(
            len(pending),
            loss=f"{last_metrics['loss']:.4f}",
            tok_s=f"{tokens_per_second:,.0f}",
            **({"mfu": f"{interval_metrics['perf/mfu']:.1%}"} if peak else {}),
        )
        pending.clear()
        interval_start, interval_steps = time.perf_counter(), 0

    with PreemptionFlag() as preemption, sharding_context(mesh, rules):
        for step in range(start_step, t.steps):
            batch = state_lib.global_batch(next(data), batch_sharding, t.global_batch_size)
            state, metrics = step_fn(state, batch)
            pending.append((step + 1, metrics))
            interval_steps += 1
            if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                flush_metrics()
            stop = preemption.agreed()
            if checkpointer is not None:
                force = stop or step + 1 == t.steps
                if checkpointer.maybe_save(step + 1, state, data.get_state(), config.to_json(), force=force):
                    flush_metrics()
            if stop:
                preempted = True
                break
        flush_metrics()
    if checkpointer is not None:
        checkpointer.wait_until_finished()
        checkpointer.close()
    progress.close()
    writer.close()
    return TrainResult(int(state["step"]), last_metrics, preempted, state)
