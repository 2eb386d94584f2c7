"""The training pipeline: packing, segment ids / positions, resume, process slicing, mixtures.

References are independent of the implementation: documents are recovered from the token
stream by their BOS/EOS bytes and compared with the raw UTF-8 of the texts.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import make_train_iterator

from plamo_jax.data.batch import FIELDS as BATCH_KEYS
from plamo_jax.data.config import data_defaults
from plamo_jax.data.pipeline import parse_sources
from plamo_jax.data.sources import read_builtin_documents
from plamo_jax.errors import DataError

BOS, EOS, PAD, BYTE_OFFSET = 1, 2, 0, 3


def byte_framed(text: str, add_bos: bool = True) -> tuple[int, ...]:
    ids = [b + BYTE_OFFSET for b in text.encode("utf-8")] + [EOS]
    return tuple([BOS] + ids if add_bos else ids)


def config(**overrides):
    data_config = data_defaults()
    for key, value in overrides.items():
        data_config[key] = value
    return data_config


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def test_builtin_corpus_is_bilingual_and_large_enough():
    texts = read_builtin_documents()
    assert len(texts) >= 150
    japanese = [t for t in texts if any("\u3040" <= ch <= "\u30ff" for ch in t)]
    english_bytes = sum(len(t.encode()) for t in texts if t not in japanese)
    japanese_bytes = sum(len(t.encode()) for t in japanese)
    assert english_bytes + japanese_bytes >= 40_000
    assert 0.4 < japanese_bytes / (english_bytes + japanese_bytes) < 0.6


def test_batch_layout_and_dtypes():
    iterator = make_train_iterator(config(), seq_len=32, global_batch_size=4, seed=0)
    batch = next(iterator)
    assert set(batch) == set(BATCH_KEYS)
    for key in ("input_ids", "target_ids", "segment_ids", "positions"):
        assert batch[key].shape == (4, 32) and batch[key].dtype == np.int32
    assert batch["loss_mask"].shape == (4, 32) and batch["loss_mask"].dtype == np.float32
    assert iterator.tokenizer.vocab_size == 259
    iterator.close()


@pytest.mark.parametrize("add_bos", [True, False])
def test_every_token_once_per_epoch(add_bos):
    seq_len, batch = 48, 8
    # Unshuffled rows: consecutive windows of the document stream (test_row_shuffle.py covers shuffled ones).
    iterator = make_train_iterator(config(add_bos=add_bos, shuffle_rows=False), seq_len=seq_len,
                                   global_batch_size=batch, seed=3)
    expected = sorted(byte_framed(text, add_bos) for text in read_builtin_documents())
    epoch_tokens = sum(len(doc) for doc in expected)
    steps = -(-epoch_tokens // (seq_len * batch)) + 1
    batches = take(iterator, steps)
    iterator.close()
    inputs = np.concatenate([b["input_ids"] for b in batches])  # rows in global order
    targets = np.concatenate([b["target_ids"] for b in batches])
    # Windows overlap by one token: each row's targets are its inputs shifted by one.
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    np.testing.assert_array_equal(targets[:-1, -1], inputs[1:, 0])
    stream = inputs.reshape(-1)[:epoch_tokens].tolist()
    documents, current = [], []
    for token in stream:
        current.append(token)
        if token == EOS:
            documents.append(tuple(current))
            current = []
    assert not current
    assert sorted(documents) == expected  # each document exactly once, whole, in the first epoch


def reference_fields(input_ids: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments restart after every EOS; a target across an EOS is not a next token of the same document."""
    segment_ids = np.zeros_like(input_ids)
    positions = np.zeros_like(input_ids)
    loss_mask = np.zeros(input_ids.shape, np.float32)
    for row in range(input_ids.shape[0]):
        segment, position = 1, 0
        for i, token in enumerate(input_ids[row]):
            if i > 0 and input_ids[row, i - 1] == eos_id:
                segment, position = segment + 1, 0
            segment_ids[row, i] = segment
            positions[row, i] = position
            loss_mask[row, i] = 0.0 if token == eos_id else 1.0
            position += 1
    return segment_ids, positions, loss_mask


@pytest.mark.parametrize("add_bos", [True, False])
def test_segment_ids_positions_and_loss_mask(add_bos):
    iterator = make_train_iterator(config(add_bos=add_bos), seq_len=96, global_batch_size=4, seed=1)
    batches = take(iterator, 12)
    iterator.close()
    multi_document_rows = 0
    for batch in batches:
        segment_ids, positions, loss_mask = reference_fields(batch["input_ids"], EOS)
        np.testing.assert_array_equal(batch["segment_ids"], segment_ids)
        np.testing.assert_array_equal(batch["positions"], positions)
        np.testing.assert_array_equal(batch["loss_mask"], loss_mask)
        multi_document_rows += int((batch["segment_ids"].max(axis=1) > 1).sum())
        if add_bos:  # after an EOS comes the next document's BOS
            after_eos = batch["input_ids"][:, 1:][batch["input_ids"][:, :-1] == EOS]
            assert np.all(after_eos == BOS)
    assert multi_document_rows > 5  # the check above really exercised document boundaries


def test_pad_packing_keeps_documents_apart_and_complete():
    seq_len = 64
    iterator = make_train_iterator(config(packing="pad"), seq_len=seq_len, global_batch_size=4, seed=0)
    texts = read_builtin_documents()
    rows_per_epoch = int(iterator.rows.packed[0].rows_per_epoch)
    assert rows_per_epoch == sum(-(-(len(byte_framed(t)) - 1) // seq_len) for t in texts)
    batches = take(iterator, rows_per_epoch // 4 + 1)
    stats = iterator.stats()
    iterator.close()
    rows = {key: np.concatenate([b[key] for b in batches])[:rows_per_epoch] for key in BATCH_KEYS}
    assert set(np.unique(rows["segment_ids"])) <= {0, 1}
    real = rows["segment_ids"] == 1
    assert np.all(rows["input_ids"][~real] == PAD) and np.all(rows["loss_mask"][~real] == 0)
    assert np.all(rows["loss_mask"][real] == 1)  # a row holds one document, so every target counts
    pairs = Counter()
    for inputs, targets, mask in zip(rows["input_ids"], rows["target_ids"], real, strict=True):
        pairs.update(zip(inputs[mask].tolist(), targets[mask].tolist(), strict=True))
    expected = Counter()
    for text in texts:
        doc = byte_framed(text)
        expected.update(zip(doc[:-1], doc[1:], strict=True))
    assert pairs == expected  # every (token, next token) pair of every document exactly once
    assert 0.3 < stats["packing_efficiency"] < 1.0


def test_resume_gives_the_same_batches():
    kwargs = dict(seq_len=40, global_batch_size=6, seed=7)
    reference = make_train_iterator(config(), **kwargs)
    expected = take(reference, 9)
    reference.close()
    first = make_train_iterator(config(), **kwargs)
    take(first, 4)
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    first.close()
    resumed = make_train_iterator(config(), **kwargs)
    resumed.set_state(state)
    assert resumed.step == 4
    for want, got in zip(expected[4:], take(resumed, 5), strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])
    resumed.close()


def test_resume_refuses_a_different_data_config():
    first = make_train_iterator(config(), seq_len=16, global_batch_size=2, seed=0)
    next(first)
    state = first.get_state()
    first.close()
    other = make_train_iterator(config(add_bos=False), seq_len=16, global_batch_size=2, seed=0)
    with pytest.raises(DataError, match="fingerprint"):
        other.set_state(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_together_give_the_single_process_batches(process_count):
    kwargs = dict(seq_len=24, global_batch_size=8, seed=5)
    single = make_train_iterator(config(), **kwargs)
    expected = take(single, 4)
    single.close()
    per_process = []
    for process_index in range(process_count):
        iterator = make_train_iterator(
            config(), **kwargs, process_index=process_index, process_count=process_count
        )
        per_process.append(take(iterator, 4))
        iterator.close()
    for step in range(4):
        for key in BATCH_KEYS:
            local = [batches[step][key] for batches in per_process]
            assert local[0].shape == (8 // process_count, 24)
            np.testing.assert_array_equal(np.concatenate(local), expected[step][key])
            np.testing.assert_array_equal(expected[step][key], single.global_batch(step * 8)[key])


def test_elastic_resume_with_a_different_process_count():
    kwargs = dict(seq_len=24, global_batch_size=8, seed=2)
    single = make_train_iterator(config(), **kwargs)
    expected = take(single, 5)
    single.close()
    two = [make_train_iterator(config(), **kwargs, process_index=p, process_count=2) for p in range(2)]
    for iterator in two:
        take(iterator, 3)
    state = two[0].get_state()
    assert state == two[1].get_state()
    for iterator in two:
        iterator.close()
    resumed = make_train_iterator(config(), **kwargs)
    resumed.set_state(state)
    for want, got in zip(expected[3:], take(resumed, 2), strict=True):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    resumed.close()


def test_different_seeds_give_different_orders():
    a = make_train_iterator(config(), seq_len=32, global_batch_size=4, seed=0)
    b = make_train_iterator(config(), seq_len=32, global_batch_size=4, seed=1)
    assert not np.array_equal(next(a)["input_ids"], next(b)["input_ids"])
    a.close()
    b.close()


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    return path


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2)])
def test_mixture_token_shares_match_weights(tmp_path, weights):
    # Each corpus uses its own alphabet, so a row's corpus can be read off its bytes.
    alphabets = ["abcdefgh ", "01234567 ", "かきくけこ"]
    rng = np.random.default_rng(0)
    sources = []
    for index, weight in enumerate(weights):
        letters = alphabets[index]
        texts = ["".join(rng.choice(list(letters), size=rng.integers(20, 120))) for _ in range(30)]
        sources.append(f"{write_jsonl(tmp_path / f'c{index}.jsonl', texts)}:{weight}")
    seq_len, batch, steps = 16, 50, 60
    iterator = make_train_iterator(
        config(source=",".join(sources)), seq_len=seq_len, global_batch_size=batch, seed=0
    )
    alphabet_ids = [
        {b + BYTE_OFFSET for b in letters.encode("utf-8")} | {BOS, EOS}
        for letters in alphabets[: len(weights)]
    ]
    tokens = np.zeros(len(weights))
    for batch_arrays in take(iterator, steps):
        for row in batch_arrays["input_ids"]:
            owners = [i for i, ids in enumerate(alphabet_ids) if set(row.tolist()) <= ids]
            assert len(owners) == 1
            tokens[owners[0]] += len(row)
    shares = tokens / tokens.sum()
    np.testing.assert_allclose(shares, np.array(weights) / sum(weights), atol=0.01)
    np.testing.assert_allclose(iterator.stats()["token_share_per_corpus"], shares)
    iterator.close()


def test_parse_sources():
    specs = parse_sources("builtin, data/ja:0.75,seqio:my_task")
    assert [(s.path, s.weight) for s in specs] == [
        ("builtin", 1.0),
        ("data/ja", 0.75),
        ("seqio:my_task", 1.0),
    ]
    for bad in ("a:0", "a:-1", "a:inf", "a:nan"):
        with pytest.raises(DataError, match="weight"):
            parse_sources(bad)
    with pytest.raises(DataError, match="empty entry"):
        parse_sources("a,,b")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("packing", "greedy", "data.packing"),
        ("on_bad_input", "ignore", "data.on_bad_input"),
        ("num_threads", 0, "data.num_threads"),
        ("tokenizer", "nonsense", "data.tokenizer"),
    ],
)
def test_bad_config_values_name_the_key(key, value, message):
    with pytest.raises(DataError, match=message):
        make_train_iterator(config(**{key: value}), seq_len=8, global_batch_size=2, seed=0)


def test_batch_size_must_divide_across_processes():
    with pytest.raises(DataError, match="global_batch_size"):
        make_train_iterator(config(), seq_len=8, global_batch_size=3, seed=0, process_count=2)


def test_resume_with_a_different_global_batch_size_continues_at_the_same_row():
    first = make_train_iterator(config(packing="pad"), seq_len=20, global_batch_size=6, seed=8)
    take(first, 3)
    state = first.get_state()
    assert state["rows_consumed"] == 18
    first.close()
    resumed = make_train_iterator(config(packing="pad"), seq_len=20, global_batch_size=4, seed=8)
    resumed.set_state(state)
    got = take(resumed, 2)
    for step, batch in enumerate(got):
        want = resumed.global_batch(18 + 4 * step)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(batch[key], want[key])
    assert resumed.get_state()["rows_consumed"] == 26
    resumed.close()
