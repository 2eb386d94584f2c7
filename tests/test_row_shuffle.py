"""Row shuffling (data.shuffle_rows): a bijection per epoch-sized block, every token still once per epoch,
rows of a batch from distant windows, and resume / elastic resume exact."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from helpers import make_train_iterator

from plamo_jax.data.batch import FIELDS
from plamo_jax.data.config import data_defaults
from plamo_jax.data.documents import documents_from_token_lists
from plamo_jax.data.packing import PackedRows
from plamo_jax.data.permutation import IndexPermutation
from plamo_jax.errors import DataError


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 4097])
def test_index_permutation_is_a_bijection(size):
    permutation = IndexPermutation(size, key=12345)
    values = [permutation(i) for i in range(size)]
    assert sorted(values) == list(range(size))
    if size >= 64:
        assert values != list(range(size))
        assert values != [IndexPermutation(size, key=54321)(i) for i in range(size)]
    with pytest.raises(IndexError):
        permutation(size)


def unique_token_documents(total_tokens: int, seed: int = 0):
    """Documents whose tokens are 0..total_tokens-1, each id once: a token's occurrences are countable."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(total_tokens).astype(np.int32)
    cuts = np.sort(rng.choice(np.arange(2, total_tokens - 2, 2), size=total_tokens // 40, replace=False))
    return documents_from_token_lists(np.split(ids, cuts))


def rows(packed: PackedRows, start: int, count: int) -> list[dict[str, np.ndarray]]:
    return [packed[index] for index in range(start, start + count)]


@pytest.mark.parametrize("total_tokens, packing", [(4800, "concat"), (4813, "concat"), (4813, "pad")])
def test_every_token_is_an_input_once_per_epoch(total_tokens, packing):
    """A block holds the rows it held unshuffled: the same tokens and (input, target) pairs, reordered."""
    seq_len = 16
    documents = unique_token_documents(total_tokens)
    shuffled = PackedRows(documents, seq_len=seq_len, seed=1, packing=packing, shuffle_rows=True)
    plain = PackedRows(documents, seq_len=seq_len, seed=1, packing=packing, shuffle_rows=False)
    block = shuffled.shuffle_block_rows
    assert block == int(np.ceil(plain.rows_per_epoch))
    first_tokens = {int(documents.document(d)[0]) for d in range(documents.num_documents)}
    for epoch_block in range(3):
        got, want = rows(shuffled, epoch_block * block, block), rows(plain, epoch_block * block, block)
        assert [r["input_ids"].tolist() for r in got] != [r["input_ids"].tolist() for r in want]
        def pairs(rows_):
            return Counter(pair for r in rows_ for pair in zip(
                r["input_ids"].tolist(), r["target_ids"].tolist(), r["loss_mask"].tolist(), strict=True))
        assert pairs(got) == pairs(want)
        inputs = Counter(t for r in got for t in r["input_ids"][r["segment_ids"] > 0].tolist())
        learned = Counter(t for r in got for t in r["target_ids"][r["loss_mask"] > 0].tolist())
        if packing == "pad" or total_tokens % seq_len == 0:  # the block is exactly one epoch
            assert learned == Counter(set(range(total_tokens)) - first_tokens)  # every next token once
        if packing == "concat" and (epoch_block == 0 or total_tokens % seq_len == 0):
            # rows cut every seq_len tokens: a block of ceil(T / seq_len) rows inputs every token of
            # its epoch, once (some next-epoch tokens too when T is not a multiple of seq_len)
            assert set(inputs) == set(range(total_tokens))
            assert set(inputs.values()) == ({1} if total_tokens % seq_len == 0 else {1, 2})


def test_rows_of_a_batch_come_from_distant_windows():
    """Statistic: mean distance, in unshuffled row order, between the rows of a batch (uniform: 1/3 of S)."""
    seq_len, batch = 16, 16
    documents = unique_token_documents(16 * 2000)
    shuffled = PackedRows(documents, seq_len=seq_len, seed=4, shuffle_rows=True)
    plain = PackedRows(documents, seq_len=seq_len, seed=4, shuffle_rows=False)
    block = shuffled.shuffle_block_rows
    # A window's first input token is unique within an epoch: it names the window's unshuffled row.
    row_of_first_token = {int(plain[i]["input_ids"][0]): i for i in range(block)}

    def batch_spreads(packed):
        spreads, adjacent = [], 0
        for start in range(0, block - batch + 1, batch):
            firsts = [int(r["input_ids"][0]) for r in rows(packed, start, batch)]
            origin = np.array([row_of_first_token[token] for token in firsts])
            gaps = np.abs(origin[:, None] - origin[None, :])[np.triu_indices(batch, 1)]
            spreads.append(gaps.mean() / block)
            adjacent += int(np.count_nonzero(gaps == 1))
        return float(np.mean(spreads)), adjacent / (len(spreads) * batch * (batch - 1) / 2)

    shuffled_spread, shuffled_adjacent = batch_spreads(shuffled)
    plain_spread, plain_adjacent = batch_spreads(plain)
    assert 0.30 < shuffled_spread < 0.37 and shuffled_adjacent < 0.005
    assert plain_spread < 0.005 and plain_adjacent > 0.1  # today's consecutive windows


def data_config(**overrides):
    config = data_defaults()
    config.update(overrides)
    return config


@pytest.mark.parametrize("packing", ["concat", "pad"])
def test_resume_and_another_process_count_equal_the_uninterrupted_run(packing):
    config = data_config(packing=packing, source="builtin:1,builtin:0.5")
    assert config.shuffle_rows  # the default
    kwargs = dict(seq_len=32, global_batch_size=8, seed=11)
    single = make_train_iterator(config, **kwargs)
    expected = [next(single) for _ in range(8)]
    single.close()
    first = make_train_iterator(config, **kwargs)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = [make_train_iterator(config, **kwargs, process_index=p, process_count=4) for p in range(4)]
    for iterator in resumed:
        iterator.set_state(state)
    for step in range(3, 8):
        batches = [next(iterator) for iterator in resumed]
        for key in FIELDS:
            np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]), expected[step][key])
    for iterator in resumed:
        iterator.close()


def test_shuffled_rows_are_a_different_data_order_for_resume():
    kwargs = dict(seq_len=16, global_batch_size=2, seed=0)
    shuffled = make_train_iterator(data_config(), **kwargs)
    plain = make_train_iterator(data_config(shuffle_rows=False), **kwargs)
    assert not np.array_equal(next(shuffled)["input_ids"], next(plain)["input_ids"])
    with pytest.raises(DataError, match="data.shuffle_rows=False"):
        plain.set_state(shuffled.get_state())
    shuffled.close()
    plain.close()
    # fit packing already visits its rows in a shuffled order: the key changes nothing there
    fit = [make_train_iterator(data_config(packing="fit", shuffle_rows=flag), **kwargs)
           for flag in (True, False)]
    assert fit[0].fingerprint == fit[1].fingerprint
    np.testing.assert_array_equal(next(fit[0])["input_ids"], next(fit[1])["input_ids"])
    for iterator in fit:
        iterator.close()
