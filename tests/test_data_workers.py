"""Grain worker processes and reader threads do not change the batches."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_train_iterator

from plamo_jax.data.batch import FIELDS as BATCH_KEYS
from plamo_jax.data.config import data_defaults


@pytest.mark.parametrize(("worker_count", "num_threads"), [(0, 1), (0, 4), (2, 2)])
def test_workers_and_threads_give_the_same_batches(worker_count, num_threads):
    reference = make_train_iterator(data_defaults(), seq_len=32, global_batch_size=4, seed=4)
    expected = [next(reference) for _ in range(6)]
    reference.close()
    config = data_defaults()
    config.worker_count = worker_count
    config.num_threads = num_threads
    config.prefetch_batches = 3
    iterator = make_train_iterator(config, seq_len=32, global_batch_size=4, seed=4, process_index=0)
    for want in expected[:3]:
        got = next(iterator)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])
    state = iterator.get_state()
    iterator.close()
    resumed = make_train_iterator(config, seq_len=32, global_batch_size=4, seed=4)
    resumed.set_state(state)
    for want in expected[3:]:
        np.testing.assert_array_equal(next(resumed)["input_ids"], want["input_ids"])
    resumed.close()
