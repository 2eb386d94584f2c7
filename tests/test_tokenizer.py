"""Tokenizers: byte, SentencePiece (trained here), Hugging Face tokenizer.json; Japanese round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from plamo_jax.data.sources import read_builtin_documents
from plamo_jax.data.tokenizer import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    encode_to_array,
    load_tokenizer,
)
from plamo_jax.data.tokenizer_training import TokenizerTrainingSettings, train_sentencepiece
from plamo_jax.errors import DataError

SAMPLES = [
    "吾輩は猫である。名前はまだ無い。",
    "  先頭と末尾の空白、全角「かっこ」と半角(かっこ)、ｶﾀｶﾅ、１２３ and 123.  ",
    "改行を\n含む\n\n文章と絵文字🍣、まれな漢字𠮷。",
    "English with a tab\tand mixed 日本語 text.",
]


def test_byte_tokenizer_layout_and_round_trip():
    tokenizer = ByteTokenizer()
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, 2, 259)
    assert isinstance(tokenizer, Tokenizer)
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert ids == [b + 3 for b in text.encode("utf-8")]
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id]) == text
        np.testing.assert_array_equal(encode_to_array(tokenizer, text), ids)
    # A cut inside a multi-byte character decodes with a replacement mark instead of failing.
    assert tokenizer.decode(tokenizer.encode("猫")[:2]) == "\ufffd"


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "ja_en"
    settings = TokenizerTrainingSettings(
        vocab_size=1200, model_type="bpe", user_defined_symbols=("<|im_start|>", "<|im_end|>")
    )
    model_path, report = train_sentencepiece(["builtin"], prefix, settings)
    assert report.documents == len(read_builtin_documents())
    return model_path


def test_sentencepiece_round_trip_and_specials(sentencepiece_model):
    tokenizer = load_tokenizer(str(sentencepiece_model))
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, 2, 1200)
    for text in SAMPLES + read_builtin_documents()[:20]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert max(ids) < tokenizer.vocab_size and tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    # The user-defined symbol is one piece; learned merges make Japanese shorter than its bytes.
    marked = tokenizer.encode("<|im_start|>こんにちは")
    assert tokenizer.id_to_piece(marked[0]) == "<|im_start|>"
    japanese = read_builtin_documents()[1]
    assert len(tokenizer.encode(japanese)) < len(japanese.encode("utf-8")) / 2
    # Characters the model never saw fall back to bytes rather than <unk>.
    assert 3 not in tokenizer.encode("𠮷🍣")


def test_sentencepiece_unigram_trains(tmp_path):
    settings = TokenizerTrainingSettings(vocab_size=1200, model_type="unigram")
    model_path, _ = train_sentencepiece(["builtin"], tmp_path / "uni", settings)
    tokenizer = SentencePieceTokenizer(model_path)
    for text in SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_sentencepiece_training_rejects_a_tiny_vocab(tmp_path):
    with pytest.raises(DataError, match="vocab_size=100"):
        train_sentencepiece(["builtin"], tmp_path / "x", TokenizerTrainingSettings(vocab_size=100))


@pytest.fixture(scope="module")
def huggingface_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    directory = tmp_path_factory.mktemp("hf")
    model = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None, byte_fallback=False))
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(read_builtin_documents(), trainer=trainer)
    model.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|bos|>", "eos_token": {"content": "<|eos|>"}, "pad_token": "<|pad|>"})
    )
    return directory


def test_huggingface_tokenizer_json(huggingface_dir):
    tokenizer = load_tokenizer(str(huggingface_dir))
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == text
    explicit = load_tokenizer(str(huggingface_dir / "tokenizer.json"), eos_token="<|bos|>")
    assert explicit.eos_id == 1 and explicit.fingerprint() != tokenizer.fingerprint()
    with pytest.raises(DataError, match="not in the vocabulary"):
        load_tokenizer(str(huggingface_dir), bos_token="<nope>")


def test_load_tokenizer_errors_name_the_input(tmp_path):
    with pytest.raises(DataError, match="missing.model"):
        load_tokenizer(str(tmp_path / "missing.model"))
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a model")
    with pytest.raises(DataError, match="broken.model"):
        load_tokenizer(str(broken))
    with pytest.raises(DataError, match="data.tokenizer"):
        load_tokenizer("gpt5")
