"""Guards against divergence: skipped bad steps, spikes, vouched-for retention, rewinds, the stop.

Faults come from an objective registered here (the public objective registry): its iterator marks
chosen batches of the data stream, and its loss multiplies those batches' loss by NaN (a bad batch)
or by 1000 (a spike). Batches are named by their index in the stream, so a rewind that skips them
does not meet them again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import one_device_step, random_batch, small_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from plamo_jax.data.pipeline import TrainIterator
from plamo_jax.errors import TrainingDiverged
from plamo_jax.train import guards, objectives
from plamo_jax.train.checkpoint import Checkpointer, load_params
from plamo_jax.train.objectives.lm import CORPUS_FORMATS, LanguageModeling
from plamo_jax.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
FACTORS = {"nan": float("nan"), "spike": 1000.0}


class FaultyIterator(TrainIterator):
    def __init__(self, *args, faults: dict[int, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = faults

    def __next__(self):
        stream_batch = self.rows_consumed // self.global_batch_size  # before this batch is taken
        batch = super().__next__()
        factor = FACTORS.get(self.faults.get(stream_batch, ""), 1.0)
        batch["fault_factor"] = np.full(batch["loss_mask"].shape, factor, np.float32)
        return batch


class FaultyLM(LanguageModeling):
    """Language modelling whose loss is multiplied by the batch's fault factor."""

    name = "faulty_lm"
    faults: dict[int, str] = {}

    def make_iterator(self, data_config, **kwargs):
        return FaultyIterator(data_config, formats=CORPUS_FORMATS, faults=dict(self.faults), **kwargs)

    def loss_sums(self, graphdef, params, frozen, batch, config):
        objective, sums = super().loss_sums(graphdef, params, frozen, batch, config)
        factor = batch["fault_factor"][0, 0]
        return objective * factor, {**sums, "cross_entropy": sums["cross_entropy"] * factor}


@pytest.fixture
def faulty(monkeypatch):
    objectives.register_objective(FaultyLM())
    yield FaultyLM
    objectives.OBJECTIVES.pop(FaultyLM.name)
    FaultyLM.faults = {}


def guarded_config(tmp_path, steps: int, **train):
    config = small_config(vocab_size=512)
    config.data.format = "text"
    config.train.update(objective="faulty_lm", steps=steps, global_batch_size=8, seq_len=32, log_every=2,
                        output_dir=str(tmp_path), spike_warmup=6, **train)
    config.checkpoint.update(enabled=True, every_steps=4, keep_last=1, async_save=False)
    config.optimizer.update(warmup_steps=2, learning_rate=3e-3)
    config.mesh.update(data=-1)  # the 8 simulated devices
    return config


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_spike_rule_is_mean_plus_sigma_std_of_the_healthy_window():
    settings = guards.GuardSettings(spike_sigma=3.0, window=4, warmup=3, patience=0)
    guard = guards.initial_state(settings)
    history = [2.0, 2.2, 1.9, 2.1, 2.05]  # five healthy steps into a window of four
    for value in history:
        reason, guard = guards.assess(guard, jnp.float32(value), jnp.float32(1.0), jnp.float32(1.0), settings)
        assert int(reason) == guards.HEALTHY
    window = np.array(history[-4:], np.float32)
    bar = window.mean() + 3.0 * window.std()
    below, _ = guards.assess(guard, jnp.float32(bar - 1e-3), jnp.float32(1.0), jnp.float32(1.0), settings)
    above, after = guards.assess(guard, jnp.float32(bar + 1e-3), jnp.float32(1.0), jnp.float32(1.0), settings)
    assert int(below) == guards.HEALTHY and int(above) == guards.LOSS_SPIKE
    assert int(after["bad_in_a_row"]) == 1 and int(after["healthy"]) == 5  # a spike does not enter the window
    np.testing.assert_array_equal(after["losses"], guard["losses"])
    nan, _ = guards.assess(guard, jnp.float32(2.0), jnp.float32(np.inf), jnp.float32(1.0), settings)
    assert int(nan) == guards.NOT_FINITE
    cold = guards.initial_state(settings)  # before `warmup` healthy steps nothing is a spike
    reason, _ = guards.assess(cold, jnp.float32(1e9), jnp.float32(1.0), jnp.float32(1.0), settings)
    assert int(reason) == guards.HEALTHY


def test_a_lasting_gradient_norm_spike_is_taken_after_patience_and_a_lasting_loss_spike_never_is():
    """Skipping cannot cure a spike an applied update caused. A gradient-norm level shift with a normal loss
    is taken after `patience` skips (the FP8 run that stopped at max_bad_steps recovers unguarded); a
    loss that stays up is a damaged model and is never taken, nor is a non-finite step."""
    settings = guards.GuardSettings(spike_sigma=3.0, window=8, warmup=3, patience=2)

    def assess_all(pairs, guard=None):
        guard = guards.initial_state(settings) if guard is None else guard
        reasons = []
        for loss, grad_norm in pairs:
            reason, guard = guards.assess(guard, jnp.float32(loss), jnp.float32(grad_norm), jnp.float32(1.0),
                                          settings)
            reasons.append(int(reason))
        return reasons, guard

    calm = [(2.0, 1.0), (2.1, 1.1), (1.9, 0.9), (2.0, 1.0)]
    reasons, guard = assess_all(calm + [(2.0, 9.0), (2.1, 9.1), (1.9, 8.9), (2.0, 9.0)])
    assert reasons[4:] == [guards.GRAD_SPIKE] * 2 + [guards.HEALTHY] * 2
    assert int(guard["taken"]) == 1 and int(guard["skipped"]) == 2 and int(guard["bad_in_a_row"]) == 0
    assert float(guard["grad_norms"][4]) == np.float32(8.9)  # the taken step entered the window
    # two gradient spikes, then a normal batch: the count starts again, nothing is taken
    reasons, guard = assess_all(calm + [(2.0, 9.0), (2.0, 9.0), (2.0, 1.0), (2.0, 9.0)])
    assert reasons[-1] == guards.GRAD_SPIKE and int(guard["taken"]) == 0
    # a loss that stays up (the learning rate of 1e3) is skipped however long it lasts
    reasons, guard = assess_all(calm + [(3e9, 2e7)] * 6)
    assert reasons[4:] == [guards.LOSS_SPIKE] * 6 and int(guard["taken"]) == 0
    reasons, guard = assess_all([(np.nan, 1.0)] * 5, guard)
    assert reasons == [guards.NOT_FINITE] * 5 and int(guard["bad_in_a_row"]) == 11


def test_a_non_finite_step_leaves_parameters_and_optimizer_state_bit_identical():
    config = small_config()
    step, state = one_device_step(config)
    good = random_batch(np.random.default_rng(0), 8, 16, config.model.vocab_size)
    state, _ = step(state, good, None)
    before = jax.device_get(state)
    bad = dict(good, loss_mask=np.where(np.arange(16) == 3, np.nan, good["loss_mask"]).astype(np.float32))
    after, metrics = jax.device_get(step(state, bad, None))
    assert int(metrics["guard/skip_reason"]) == guards.NOT_FINITE and not np.isfinite(metrics["loss"])
    for old, new in zip(jax.tree.leaves((before["params"], before["opt_state"])),
                        jax.tree.leaves((after["params"], after["opt_state"])), strict=True):
        np.testing.assert_array_equal(old, new)
    assert int(after["step"]) == int(before["step"]) + 1  # the data stays aligned with the step
    assert int(after["guard"]["skipped"]) == 1 and int(after["guard"]["bad_in_a_row"]) == 1


def test_bad_steps_are_skipped_counted_and_logged(faulty, tmp_path, caplog):
    faulty.faults = {5: "nan", 9: "spike"}  # stream batches 5 and 9 are steps 6 and 10
    with caplog.at_level("WARNING", logger="plamo_jax.train.trainer"):
        result = train(guarded_config(tmp_path, 12))
    assert result.final_step == 12 and np.isfinite(result.last_metrics["loss"])
    reasons = {line["step"]: line["guard/skip_reason"] for line in read_metrics(tmp_path)}
    assert reasons[6] == guards.NOT_FINITE and reasons[10] == guards.LOSS_SPIKE
    assert all(reason == 0 for step, reason in reasons.items() if step not in (6, 10))
    assert result.last_metrics["guard/skipped"] == 2
    assert "step 6 (not finite" in caplog.text and "step 10 (loss spike" in caplog.text
    # TensorBoard holds the health, guard and goodput scalars.
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("health/grad_norm/blocks/0", "health/update_ratio/embed", "health/param_norm/final_norm",
                "max/attention_logit/0", "max/output_logit", "z_loss", "guard/skipped",
                "goodput/productive_fraction", "goodput/compile_seconds", "perf/mfu"):
        assert tag in tags, tag


def test_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(faulty, tmp_path):
    faulty.faults = {batch: "nan" for batch in range(9, 40)}  # every step from 10 on is bad
    config = guarded_config(tmp_path, 30, max_bad_steps=4)
    with pytest.raises(TrainingDiverged, match=r"train\.max_bad_steps=4.*newest good checkpoint is step 8"):
        train(config)
    checkpoints = Checkpointer(tmp_path / "checkpoints", every_steps=4)
    assert checkpoints.all_steps() == [8]  # 12 and later were never saved: their last step was skipped
    params, _ = load_params(tmp_path / "checkpoints")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_rewind_and_skip_is_deterministic(faulty, tmp_path, caplog):
    faulty.faults = {13: "spike", 14: "spike", 15: "spike"}  # steps 14-16 spike until the data moves on
    runs = []
    for name in ("first", "second"):
        config = guarded_config(tmp_path / name, 24, rewind_after=2, rewind_skip_batches=4)
        with caplog.at_level("WARNING", logger="plamo_jax.train.trainer"):
            result = train(config)
        runs.append(read_metrics(tmp_path / name))
        assert result.final_step == 24
    assert "rewind 1 of at most 3" in caplog.text and "back to step 12" in caplog.text
    losses = [[(line["step"], line["loss"]) for line in lines] for lines in runs]
    assert losses[0] == losses[1]
    steps = [step for step, _ in losses[0]]
    assert steps == sorted(set(steps))  # the rewound steps' lines were superseded, not repeated
    assert all(line["guard/skip_reason"] == 0 for line in runs[0])  # after the skip the faults are gone
    superseded = (tmp_path / "first" / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in superseded][:2] == [13, 14]


def test_a_learning_rate_of_1e3_stops_with_a_good_checkpoint_on_disk(tmp_path):
    """The reported divergence: a run continued with learning_rate=1e3 used to end 'finished' with every
    good checkpoint deleted and NaN parameters saved."""
    common = [sys.executable, "launch/train.py", "--config", "configs/tiny.py",
              f"--config.train.output_dir={tmp_path}", "--config.model.num_layers=2",
              "--config.train.seq_len=64",
              "--config.checkpoint.every_steps=4", "--config.checkpoint.async_save=False"]
    first = subprocess.run([*common, "--config.train.steps=40"], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    good, _ = load_params(tmp_path / "checkpoints", step=40)
    diverging = subprocess.run([*common, "--config.train.steps=60", "--config.optimizer.learning_rate=1e3"],
                               cwd=REPO, capture_output=True, text=True, timeout=600)
    assert diverging.returncode == 3, diverging.stderr[-2000:]
    assert diverging.stderr.strip().splitlines()[-1].startswith("error: train.max_bad_steps=10")
    steps = Checkpointer(tmp_path / "checkpoints", every_steps=4).all_steps()
    assert 40 in steps and max(steps) == 40, steps
    kept, _ = load_params(tmp_path / "checkpoints", step=40)
    jax.tree.map(np.testing.assert_array_equal, kept, good)
