"""The optional seqio source: a clear error without the extra; real reading when seqio is installed."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from helpers import make_train_iterator

from plamo_jax.data.config import data_defaults
from plamo_jax.data.seqio_source import SEQIO_EXTRA, parse_seqio_spec
from plamo_jax.errors import DataError

SEQIO_INSTALLED = importlib.util.find_spec("seqio") is not None


def test_spec_parsing():
    assert parse_seqio_spec("c4_ja") == ("c4_ja", "train")
    assert parse_seqio_spec("c4_ja/validation") == ("c4_ja", "validation")
    with pytest.raises(DataError, match="names no task"):
        parse_seqio_spec("/train")


@pytest.mark.skipif(SEQIO_INSTALLED, reason="checks the message shown when the extra is missing")
def test_missing_seqio_names_the_extra():
    config = data_defaults()
    config.source = "seqio:some_task"
    with pytest.raises(ImportError, match=rf"pip install 'plamo_jax\[{SEQIO_EXTRA}\]'"):
        make_train_iterator(config, seq_len=8, global_batch_size=2, seed=0)


TEXTS = ["seqio の文書です。東京は晴れています。", "another seqio document about trains", "短い文。"]


def register_task(name: str, vocabulary, feature: str) -> None:
    seqio = pytest.importorskip("seqio")
    tf = pytest.importorskip("tensorflow")
    if name in seqio.TaskRegistry.names():
        return
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices({feature: TEXTS}),
            splits=["train"],
        ),
        preprocessors=[seqio.preprocessors.tokenize] if vocabulary is not None else [],
        output_features={
            feature: seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)
            if vocabulary is not None
            else seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.string, rank=0)
        },
    )


def batches(source: str, tokenizer: str, steps: int = 3):
    config = data_defaults()
    config.source, config.tokenizer, config.shuffle = source, tokenizer, False
    iterator = make_train_iterator(config, seq_len=16, global_batch_size=2, seed=0)
    out = [next(iterator) for _ in range(steps)]
    iterator.close()
    return out


def test_seqio_sentencepiece_task_gives_the_native_tokens(tmp_path):
    """A task tokenized by seqio's SentencePieceVocabulary == the native path with the same model."""
    seqio = pytest.importorskip("seqio")
    from plamo_jax.data.tokenizer_training import TokenizerTrainingSettings, train_sentencepiece

    model, _ = train_sentencepiece(
        ["builtin"], tmp_path / "spm", TokenizerTrainingSettings(vocab_size=2000, model_type="bpe")
    )
    register_task("plamo_jax_test_spm_task", seqio.SentencePieceVocabulary(str(model)), "text")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), "utf-8")
    from_seqio = batches("seqio:plamo_jax_test_spm_task", str(model))
    native = batches(str(corpus), str(model))
    for a, b in zip(from_seqio, native, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_seqio_text_task_is_tokenized_by_the_pipeline(tmp_path):
    register_task("plamo_jax_test_text_task", None, "text")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), "utf-8")
    for a, b in zip(
        batches("seqio:plamo_jax_test_text_task", "byte"), batches(str(corpus), "byte"), strict=True
    ):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
