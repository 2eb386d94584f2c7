"""Hugging Face `save_to_disk` directories as corpora: the same documents as the same texts in JSONL, token-id
columns taken as they are, DatasetDict splits, and bad rows counted or named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_train_iterator

from plamo_jax.data.batch import FIELDS
from plamo_jax.data.config import data_defaults
from plamo_jax.data.formats import read_text_corpus
from plamo_jax.data.tokenizer import ByteTokenizer
from plamo_jax.errors import DataError

datasets = pytest.importorskip("datasets")

TEXTS = ["最初の文書です。", "second document, a little longer", "三番目\n複数行", "x" * 70, "fifth"]


def data_config(**overrides):
    config = data_defaults()
    config.update(overrides)
    return config


def save(dataset, path):
    dataset.save_to_disk(str(path))
    return str(path)


def test_a_saved_dataset_trains_like_the_same_texts_in_jsonl(tmp_path):
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    dataset = datasets.Dataset.from_dict({"text": TEXTS, "other": list(range(len(TEXTS)))})
    saved = save(dataset, tmp_path / "ds")
    kwargs = dict(seq_len=16, global_batch_size=4, seed=2)
    ours = make_train_iterator(data_config(source=saved), **kwargs)
    reference = make_train_iterator(data_config(source=str(jsonl)), **kwargs)
    assert ours.read_report.documents == len(TEXTS)
    assert ours.read_report.text_bytes == sum(len(t.encode()) for t in TEXTS)
    for _ in range(12):
        got, want = next(ours), next(reference)
        for key in FIELDS:
            np.testing.assert_array_equal(got[key], want[key])
    ours.close()
    reference.close()


def test_documents_follow_selects_and_shuffles_saved_with_the_dataset(tmp_path):
    dataset = datasets.Dataset.from_dict({"text": TEXTS}).shuffle(seed=3).select([0, 2, 4])
    saved = save(dataset, tmp_path / "ds")
    tokenizer = ByteTokenizer()
    read = read_text_corpus(saved, tokenizer, data_config())
    expected = [[tokenizer.bos_id, *tokenizer.encode_array(t).tolist(), tokenizer.eos_id]
                for t in dataset["text"]]
    assert [read.documents.document(i).tolist() for i in range(read.documents.num_documents)] == expected


def test_token_id_columns_are_framed_not_tokenized(tmp_path):
    rows = [[10, 11, 12], [13, 14], [200, 201, 202, 203]]
    saved = save(datasets.Dataset.from_dict({"input_ids": rows}), tmp_path / "ids")
    tokenizer = ByteTokenizer()
    read = read_text_corpus(saved, tokenizer, data_config(text_field="input_ids", add_bos=False))
    assert [read.documents.document(i).tolist() for i in range(3)] == [r + [tokenizer.eos_id] for r in rows]
    too_big = save(datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 999]]}), tmp_path / "big")
    with pytest.raises(DataError, match=r"big:row 1: token id 999 in column 'input_ids'; expected ids in "
                                        r"\[0, 259\)"):
        read_text_corpus(too_big, tokenizer, data_config(text_field="input_ids"))


def test_a_dataset_dict_gives_its_train_split_and_names_its_splits(tmp_path):
    splits = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["held out"]}),
                                   "train": datasets.Dataset.from_dict({"text": TEXTS[:2]})})
    saved = save(splits, tmp_path / "dd")
    read = read_text_corpus(saved, ByteTokenizer(), data_config())
    assert read.report.documents == 2
    assert read_text_corpus(f"{saved}/validation", ByteTokenizer(), data_config()).report.documents == 1
    no_train = save(datasets.DatasetDict({"a": splits["train"], "b": splits["validation"]}), tmp_path / "nt")
    with pytest.raises(DataError, match=r"DatasetDict with splits \['a', 'b'\] and no 'train'"):
        read_text_corpus(no_train, ByteTokenizer(), data_config())


def test_bad_rows_are_counted_or_raise(tmp_path):
    saved = save(datasets.Dataset.from_dict({"text": ["good", None, "  ", "also good"]}), tmp_path / "ds")
    read = read_text_corpus(saved, ByteTokenizer(), data_config())
    assert read.report.documents == 2
    assert read.report.skipped == {"missing_field": 1, "empty_document": 1}
    with pytest.raises(DataError, match="ds:row 1: missing_field: column 'text' is null"):
        read_text_corpus(saved, ByteTokenizer(), data_config(on_bad_input="fail"))
    with pytest.raises(DataError, match=r"no column 'body' \(data.text_field\); it has \['text'\]"):
        read_text_corpus(saved, ByteTokenizer(), data_config(text_field="body"))
