"""Megatron-LM indexed datasets: corpora written by megatron-core's own IndexedDatasetBuilder read token for
token, through the whole pipeline (packing, blends, per-host sharding, resume), and broken files named."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from helpers import make_train_iterator

from plamo_jax.data import megatron
from plamo_jax.data.batch import FIELDS
from plamo_jax.data.config import data_defaults
from plamo_jax.data.documents import documents_from_token_lists
from plamo_jax.data.pipeline import Corpus, CorpusSpec, GlobalRows, parse_sources
from plamo_jax.data.sources import ReadReport
from plamo_jax.errors import DataError

torch = pytest.importorskip("torch")
with warnings.catch_warnings():  # megatron-core warns that Transformer Engine and Apex are missing
    warnings.simplefilter("ignore")
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def write_corpus(prefix, documents, dtype, sentence_split: bool = False) -> str:
    """megatron-core's writer; with sentence_split each document is stored as two sequences."""
    builder = indexed_dataset.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for document in documents:
        ids = torch.tensor(np.asarray(document, np.int64))
        cut = len(document) // 2
        builder.add_document(ids, [cut, len(document) - cut] if sentence_split and cut else [len(document)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def megatron_documents(prefix) -> list[np.ndarray]:
    """Documents as megatron-core's own reader sees them: the sequences between document indices."""
    dataset = indexed_dataset.IndexedDataset(str(prefix))
    bounds = dataset.document_indices
    return [np.concatenate([np.asarray(dataset[i]) for i in range(bounds[k], bounds[k + 1])])
            for k in range(len(bounds) - 1)]


def random_documents(rng, count, low, high, vocab_low=3):
    return [rng.integers(vocab_low, high, size=rng.integers(low, 200)).tolist() for _ in range(count)]


def data_config(**overrides):
    config = data_defaults()
    config.update(overrides)
    return config


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65_535), (np.int32, 3_000_000)])
@pytest.mark.parametrize("sentence_split", [False, True])
def test_documents_equal_megatron_cores_reader(tmp_path, dtype, high, sentence_split):
    rng = np.random.default_rng(0)
    documents = random_documents(rng, 37, 2, high)
    prefix = write_corpus(tmp_path / "corpus", documents, dtype, sentence_split)
    ours = megatron.open_megatron_corpus(prefix)
    theirs = megatron_documents(prefix)
    assert ours.num_documents == len(theirs) == len(documents)
    for index, (document, reference) in enumerate(zip(documents, theirs, strict=True)):
        np.testing.assert_array_equal(ours.document(index), reference)
        np.testing.assert_array_equal(ours.document(index), document)
    assert ours.parts[0].raw_dtype == np.dtype(dtype)
    assert isinstance(ours.parts[0].tokens, np.memmap)  # memory-mapped, not read into memory


def test_pipeline_rows_equal_those_of_the_same_documents_in_memory(tmp_path):
    """Packing, shuffling and batching see a Megatron corpus exactly as any other corpus of those tokens."""
    rng = np.random.default_rng(1)
    documents = random_documents(rng, 40, 2, 259)
    prefix = write_corpus(tmp_path / "c", documents, np.uint16)
    config = data_config(source=f"megatron:{prefix}")
    iterator = make_train_iterator(config, seq_len=32, global_batch_size=4, seed=3)
    in_memory = documents_from_token_lists([np.asarray(d, np.int32) for d in documents])
    corpus = Corpus(CorpusSpec(path="in memory", weight=1.0), in_memory, ReadReport(), "")
    reference = GlobalRows([corpus], config, seq_len=32, seed=3, pad_id=iterator.tokenizer.pad_id)
    for step in range(30):  # several epochs
        got = next(iterator)
        for key in FIELDS:
            want = np.stack([reference[step * 4 + row][key] for row in range(4)])
            np.testing.assert_array_equal(got[key], want)
    iterator.close()


def test_a_blend_string_meets_its_weights_within_one_percent(tmp_path):
    rng = np.random.default_rng(2)
    # Corpus A uses token ids 3..99, corpus B 100..258, so every token's corpus can be read off its id.
    prefix_a = write_corpus(tmp_path / "a_text_document", random_documents(rng, 50, 2, 100), np.uint16)
    prefix_b = write_corpus(tmp_path / "b_text_document", random_documents(rng, 20, 2, 259, vocab_low=100),
                            np.int32)
    blend = f"0.3 {prefix_a} 0.7 {prefix_b}"
    assert [(s.path, s.weight) for s in parse_sources(blend)] == [(f"megatron:{prefix_a}", 0.3),
                                                                (f"megatron:{prefix_b}", 0.7)]
    iterator = make_train_iterator(data_config(source=blend), seq_len=64, global_batch_size=32, seed=0)
    tokens = np.zeros(2)
    for _ in range(100):
        batch = next(iterator)
        real = batch["input_ids"][batch["segment_ids"] > 0]
        tokens += [np.count_nonzero(real < 100), np.count_nonzero(real >= 100)]
    iterator.close()
    np.testing.assert_allclose(tokens / tokens.sum(), [0.3, 0.7], atol=0.01)


def test_processes_and_resume_on_another_process_count_equal_the_single_run(tmp_path):
    rng = np.random.default_rng(3)
    prefix = write_corpus(tmp_path / "c", random_documents(rng, 60, 2, 259), np.uint16)
    config = data_config(source=f"megatron:{prefix}:1,builtin:0.5")
    kwargs = dict(seq_len=24, global_batch_size=8, seed=5)
    single = make_train_iterator(config, **kwargs)
    expected = [next(single) for _ in range(6)]
    single.close()
    halves = [make_train_iterator(config, **kwargs, process_index=p, process_count=2) for p in range(2)]
    for step in range(3):
        got = np.concatenate([next(half)["input_ids"] for half in halves])
        np.testing.assert_array_equal(got, expected[step]["input_ids"])
    state = json.loads(json.dumps(halves[0].get_state()))
    for half in halves:
        half.close()
    quarters = [make_train_iterator(config, **kwargs, process_index=p, process_count=4) for p in range(4)]
    for quarter in quarters:
        quarter.set_state(state)
    for step in range(3, 6):
        batches = [next(quarter) for quarter in quarters]
        for key in FIELDS:
            np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]), expected[step][key])
    for quarter in quarters:
        quarter.close()


def test_short_documents_are_counted_and_left_out(tmp_path):
    documents = [[5, 6, 7], [8], [9, 10], [11]]
    prefix = write_corpus(tmp_path / "c", documents, np.uint16)
    builder = indexed_dataset.IndexedDatasetBuilder(f"{tmp_path}/with_empty.bin", dtype=np.uint16)
    builder.add_index(prefix)
    builder.end_document()  # an empty document: a document index with no sequence
    builder.finalize(f"{tmp_path}/with_empty.idx")
    report = ReadReport()
    ours = megatron.open_megatron_corpus(tmp_path / "with_empty", report=report)
    assert [ours.document(i).tolist() for i in range(ours.num_documents)] == [[5, 6, 7], [9, 10]]
    assert report.skipped == {"short_document": 3} and report.documents == 2
    with pytest.raises(DataError, match="document 1: short_document: 1 tokens"):
        megatron.open_megatron_corpus(prefix, on_bad_input="fail")


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    prefix = write_corpus(tmp_path / "c", [[3, 4, 5], [6, 300, 7]], np.uint16)
    with pytest.raises(DataError, match=r"token id 300; expected ids in \[0, 259\)"):
        make_train_iterator(data_config(source=f"megatron:{prefix}"), seq_len=8, global_batch_size=2, seed=0)


@pytest.fixture()
def small_corpus(tmp_path):
    return write_corpus(tmp_path / "c", [[3, 4, 5, 6], [7, 8, 9], [10, 11]], np.uint16)


def test_a_truncated_bin_is_a_named_error(small_corpus):
    with open(f"{small_corpus}.bin", "r+b") as f:
        f.truncate(14)
    with pytest.raises(DataError, match=r"c\.bin' holds 14 bytes; c\.idx lists 9 uint16 tokens = 18 bytes: "
                                        "the .bin is truncated"):
        make_train_iterator(data_config(source=f"megatron:{small_corpus}"), seq_len=8, global_batch_size=2,
                            seed=0)


def _patch(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("offset, data, message", [
    (0, b"MMIDIDY", "starts with b'MMIDIDY\\\\x00\\\\x00'; expected the magic"),
    (9, (2).to_bytes(8, "little"), "MMIDIDX version 2; expected 1"),
    (17, bytes([7]), r"dtype code 7 \(float32\); expected integer token ids"),
    (17, bytes([9]), r"dtype code 9; expected one of \[1, 2, 3, 4, 5, 8\]"),
    (18, (1000).to_bytes(8, "little"), "its header .1000 sequences, 4 document-index entries. needs"),
    (34 + 4 * 3 + 8, (99).to_bytes(8, "little"), "sequence 1 points to byte 99; expected 8"),
    (34 + 12 * 3 + 8, (9).to_bytes(8, "little"), r"document index 2 is 2, below the one before it \(9\)"),
])
def test_a_corrupted_idx_is_a_named_error(small_corpus, offset, data, message):
    _patch(f"{small_corpus}.idx", offset, data)
    with pytest.raises(DataError, match=message) as error:
        megatron.open_megatron_corpus(small_corpus)
    assert "c.idx" in str(error.value)


def test_a_truncated_idx_and_a_missing_bin_are_named_errors(small_corpus, tmp_path):
    with open(f"{small_corpus}.idx", "rb") as f:
        content = f.read()
    (tmp_path / "cut.idx").write_bytes(content[:-5])
    with pytest.raises(DataError, match="cut.idx' holds 97 bytes; its header .3 sequences, 4 document-index "
                                        "entries. needs 102: the file is truncated"):
        megatron.open_megatron_corpus(tmp_path / "cut")
    (tmp_path / "alone.idx").write_bytes(content)
    with pytest.raises(DataError, match="alone.bin' does not exist"):
        megatron.open_megatron_corpus(tmp_path / "alone")
    with pytest.raises(DataError, match="nothing.idx' does not exist"):
        megatron.open_megatron_corpus(tmp_path / "nothing")


def test_blend_parsing_leaves_plain_paths_alone():
    assert megatron.parse_blend("my corpus.jsonl") is None
    assert megatron.parse_blend("builtin") is None
    assert megatron.parse_blend("1 a 2") is None
    assert megatron.parse_blend("1e-1 /d/a 3 /d/b") == [("megatron:/d/a", 0.1), ("megatron:/d/b", 3.0)]
    with pytest.raises(DataError, match="weight -1 for '/d/a'"):
        megatron.parse_blend("-1 /d/a 1 /d/b")
    specs = parse_sources("0.5 /d/a 0.5 /d/b, builtin:2")
    assert [(s.path, s.weight) for s in specs] == [("megatron:/d/a", 0.5), ("megatron:/d/b", 0.5),
                                                    ("builtin", 2.0)]
