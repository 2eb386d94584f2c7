"""Batch-size ramp-up: Megatron's rule per step, contiguous data, the schedule on samples, exact resume."""

from __future__ import annotations

import signal

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import make_train_iterator
from test_resume import committed_steps, losses, run_to_end, start_and_wait

from plamo_jax.data.config import data_defaults
from plamo_jax.train.batch_ramp import make_ramp
from plamo_jax.train.optimizer import learning_rate_schedule, run_schedule


def megatron_sizes(start: int, increment: int, ramp_samples: int, final: int, steps: int) -> list[int]:
    """Megatron-LM's rule written out: the batch of the next step from the samples consumed so far."""
    samples_per_increment = ramp_samples / ((final - start) / increment)
    sizes, consumed = [], 0
    for _ in range(steps):
        size = final if consumed > ramp_samples else start + int(consumed / samples_per_increment) * increment
        sizes.append(size)
        consumed += size
    return sizes


def ramp_config(start: int, increment: int, ramp_samples: int, final: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(rampup_batch_start=start, rampup_batch_increment=increment,
                                          rampup_samples=ramp_samples, global_batch_size=final))


@pytest.mark.parametrize("start, increment, ramp_samples, final",
                         [(8, 8, 200, 32), (16, 16, 1000, 256), (2, 2, 40, 8), (4, 12, 100, 40)])
def test_batch_size_of_every_step_is_megatrons_rule(start, increment, ramp_samples, final):
    ramp = make_ramp(ramp_config(start, increment, ramp_samples, final))
    expected = megatron_sizes(start, increment, ramp_samples, final, 300)
    assert [ramp.batch_size(step) for step in range(300)] == expected
    assert [ramp.samples_before(step) for step in range(300)] == list(np.cumsum([0, *expected[:-1]]))
    progress = [float(ramp.progress(jnp.int32(step))) for step in range(300)]
    np.testing.assert_allclose(progress, np.cumsum([0, *expected[:-1]]) / final, rtol=1e-6)


def test_no_ramp_without_all_three_keys():
    assert make_ramp(ramp_config(0, 0, 0, 32)) is None


def test_the_learning_rate_runs_on_consumed_samples():
    opt = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=4, min_lr_ratio=0.1,
                                         schedule="cosine", wsd_decay_fraction=0.2, wsd_decay_shape="linear"))
    ramp = make_ramp(ramp_config(8, 8, 200, 32))
    on_samples = learning_rate_schedule(opt, ramp.samples_before(40) / 32)
    schedule = run_schedule(opt, 40, ramp)
    for step in range(40):
        np.testing.assert_allclose(schedule(step), on_samples(ramp.samples_before(step) / 32), rtol=1e-6)
    # warmup ends after 4 full batches' worth of samples, not after 4 (smaller) ramp steps
    assert float(schedule(4)) < 0.6 and float(schedule(16)) == pytest.approx(float(on_samples(208 / 32)))


@pytest.mark.parametrize("process_count", [1, 2])
def test_the_iterator_follows_the_ramp_with_contiguous_rows(process_count):
    ramp = make_ramp(ramp_config(2, 2, 20, 8))
    kwargs = dict(seq_len=16, global_batch_size=8, seed=3, batch_sizes=ramp.batch_size)
    iterators = [make_train_iterator(data_defaults(), process_index=p, process_count=process_count, **kwargs)
                 for p in range(process_count)]
    for step in range(14):
        parts = [next(iterator) for iterator in iterators]
        rows = np.concatenate([part["input_ids"] for part in parts])
        assert len(rows) == ramp.batch_size(step)
        first = ramp.samples_before(step)
        expected = np.stack([iterators[0].rows[first + k]["input_ids"] for k in range(len(rows))])
        np.testing.assert_array_equal(rows, expected)
    assert iterators[0].get_state()["rows_consumed"] == ramp.samples_before(14)


RAMP = ("--config.train.rampup_batch_start=1", "--config.train.rampup_batch_increment=1",
        "--config.train.rampup_samples=24")  # batches 1, 1, ..., 2, ..., 3, then 4 from step ~13


def test_sigkill_in_the_middle_of_the_ramp_then_rerun_matches_the_uninterrupted_run(tmp_path):
    run_to_end(tmp_path / "whole", RAMP)
    reference = dict(losses(tmp_path / "whole"))
    killed = tmp_path / "killed"
    process = start_and_wait(killed, lambda: 8 in committed_steps(killed)
                             and max((s for s, _ in losses(killed)), default=0) >= 10, RAMP)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run_to_end(killed, RAMP)
    assert losses(killed) == sorted(reference.items())  # bitwise, and each step once
