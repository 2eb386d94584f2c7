"""The optional seqio source: a clear error without the extra; real reading when seqio is installed."""

from __future__ import annotations

import importlib.util

import pytest

from plamo_jax.data.config import data_defaults
from plamo_jax.data.errors import DataError
from plamo_jax.data.seqio_source import SEQIO_EXTRA, parse_seqio_spec

SEQIO_INSTALLED = importlib.util.find_spec("seqio") is not None


def test_spec_parsing():
    assert parse_seqio_spec("c4_ja") == ("c4_ja", "train")
    assert parse_seqio_spec("c4_ja/validation") == ("c4_ja", "validation")
    with pytest.raises(DataError, match="names no task"):
        parse_seqio_spec("/train")


@pytest.mark.skipif(SEQIO_INSTALLED, reason="checks the message shown when the extra is missing")
def test_missing_seqio_names_the_extra():
    from plamo_jax.data.pipeline import make_train_iterator

    config = data_defaults()
    config.source = "seqio:some_task"
    with pytest.raises(ImportError, match=rf"pip install 'plamo_jax\[{SEQIO_EXTRA}\]'"):
        make_train_iterator(config, seq_len=8, global_batch_size=2, seed=0)


def test_seqio_task_feeds_the_pipeline():
    seqio = pytest.importorskip("seqio")
    tf = pytest.importorskip("tensorflow")
    from plamo_jax.data.pipeline import make_train_iterator

    texts = ["seqio の文書です。", "another seqio document"]
    name = "plamo_jax_test_task"
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices({"text": texts}),
                splits=["train"],
            ),
            preprocessors=[],
            output_features={
                "text": seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.string)
            },
        )
    config = data_defaults()
    config.source = f"seqio:{name}"
    config.shuffle = False
    iterator = make_train_iterator(config, seq_len=8, global_batch_size=1, seed=0)
    first = next(iterator)["input_ids"][0].tolist()
    assert first == [1] + [b + 3 for b in texts[0].encode("utf-8")][:7]
    iterator.close()
