"""Swallow vocabulary expansion: new rows are means of the old pieces, old rows and old logits unchanged.

The old tokenizer is a small SentencePiece model trained here on mostly English text (plus the Japanese
characters, one left out on purpose); the new one is the old model with pieces of a Japanese model
appended, as Swallow extended Llama 2's tokenizer. All training text is our own writing.
"""

from __future__ import annotations

import importlib.util
import io
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plamo_jax import cli
from plamo_jax.configuration import default_config
from plamo_jax.convert.vocab import VocabExpansionError, VocabExpansionReport, expand_vocabulary
from plamo_jax.data.tokenizer import load_tokenizer
from plamo_jax.models.decoder import Decoder
from plamo_jax.train.checkpoint import load_params, save_params

REPO = pathlib.Path(__file__).resolve().parents[1]

ENGLISH = """\
The library near the station reopened after half a year of repairs.
Children can reach the picture books on the low shelves, and parents read with them.
A quiet room upstairs has desks with power sockets for students who study late.
Old maps and photographs of the river district fill the local history room.
Residents asked for a gentle slope at the entrance and a roof over the bicycles.
Both requests were granted, and the staff say that visitors have doubled.
図書館は駅の近くにある。子どもは絵本を読む。学生は二階の部屋で勉強する。
"""
JAPANESE = """\
駅の近くの図書館は、去年の春から改修工事をしていた。
図書館の二階には、学生が勉強できる静かな部屋がある。
子どもは図書館で絵本を読み、学生は二階の部屋で勉強する。
図書館の入口には坂道ができ、自転車の屋根もできた。
古い地図と写真は、図書館の郷土資料の部屋に残っている。
学生も子どもも、図書館の新しい部屋を気に入っている。
"""
UNKNOWN_TO_OLD = "料"  # kept out of the old model's characters: its pieces are the unknown piece


def train_sentencepiece(text: str, vocab_size: int, model_type: str) -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2,
    )
    return model.getvalue()


def extended_model(old_model: bytes, extra_model: bytes) -> bytes:
    """The old model with the extra model's multi-character pieces it lacks appended (Swallow's merge)."""
    from sentencepiece import sentencepiece_model_pb2

    old, extra = sentencepiece_model_pb2.ModelProto(), sentencepiece_model_pb2.ModelProto()
    old.ParseFromString(old_model)
    extra.ParseFromString(extra_model)
    have = {piece.piece for piece in old.pieces}
    for piece in extra.pieces:
        if piece.type == piece.NORMAL and len(piece.piece) > 1 and piece.piece not in have:
            old.pieces.append(piece)
    return old.SerializeToString()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizers")
    characters = "".join(sorted(set(JAPANESE) - set("\n" + UNKNOWN_TO_OLD)))
    old_model = train_sentencepiece(ENGLISH + characters + "\n", 400, "unigram")
    japanese_model = train_sentencepiece(JAPANESE, 200, "bpe")
    paths = {"old": directory / "old.model", "new": directory / "new.model", "ja": directory / "ja.model"}
    paths["old"].write_bytes(old_model)
    paths["new"].write_bytes(extended_model(old_model, japanese_model))
    paths["ja"].write_bytes(japanese_model)
    return paths


def sentencepiece_processor(tokenizer):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.path))


def model_config(vocab_size: int, tie_embeddings: bool):
    cfg = default_config().model
    cfg.update(vocab_size=vocab_size, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
               mlp_dim=32, tie_embeddings=tie_embeddings)
    return cfg


def pure_params(cfg) -> dict:
    return nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))


def logits_of(cfg, params, ids: np.ndarray) -> np.ndarray:
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    ids = jnp.asarray(ids)[None, :]
    positions = jnp.arange(ids.shape[1])[None, :]
    logits, _ = model(ids, jnp.ones_like(ids), positions)
    return np.asarray(logits[0])


def output_rows(params: dict, cfg) -> np.ndarray:
    """[V, D] output embeddings: the shared embed when tied, lm_head transposed otherwise."""
    return np.asarray(params["embed"] if cfg.tie_embeddings else params["lm_head"].T)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def expanded(request, tokenizers):
    old_tokenizer = load_tokenizer(str(tokenizers["old"]))
    new_tokenizer = load_tokenizer(str(tokenizers["new"]))
    cfg = model_config(256, tie_embeddings=request.param)
    params = pure_params(cfg)
    report = VocabExpansionReport()
    new_params, new_cfg = expand_vocabulary(params, cfg, old_tokenizer, new_tokenizer, report=report)
    return old_tokenizer, new_tokenizer, cfg, params, new_cfg, new_params, report


def test_sizes_padding_and_report(expanded):
    old_tokenizer, new_tokenizer, cfg, params, new_cfg, new_params, report = expanded
    old_size, new_size = old_tokenizer.vocab_size, new_tokenizer.vocab_size
    assert old_size < 256 < new_size <= 384  # the fixture's vocabularies need a second block of 128
    assert new_cfg.vocab_size == 384 and cfg.vocab_size == 256  # the input config is left alone
    assert new_params["embed"].shape == (384, 16)
    if not cfg.tie_embeddings:
        assert new_params["lm_head"].shape == (16, 384)
    assert new_params["blocks"] is params["blocks"]
    assert (report.old_tokens, report.new_tokens, report.padding_rows) == (old_size, new_size, 384 - new_size)
    assert report.mean_of_pieces + report.mean_of_all == new_size - old_size
    assert report.mean_of_all == 0 and report.unknown_pieces_dropped >= 1


def test_old_rows_unchanged_and_padding_is_the_mean_of_old_rows(expanded):
    old_tokenizer, new_tokenizer, cfg, params, new_cfg, new_params, _ = expanded
    old_size, new_size = old_tokenizer.vocab_size, new_tokenizer.vocab_size
    for rows, old_rows in ((new_params["embed"], params["embed"]), (output_rows(new_params, new_cfg),
                                                                     output_rows(params, cfg))):
        np.testing.assert_array_equal(rows[:old_size], old_rows[:old_size])
        expected_padding = np.asarray(old_rows[:old_size], np.float64).mean(axis=0)
        np.testing.assert_allclose(rows[new_size:], np.broadcast_to(expected_padding, rows[new_size:].shape),
                                   rtol=1e-6, atol=1e-8)


def test_a_hand_split_token_is_the_mean_of_its_three_characters(expanded):
    old_tokenizer, new_tokenizer, cfg, params, new_cfg, new_params, _ = expanded
    new_id = sentencepiece_processor(new_tokenizer).piece_to_id("図書館")
    assert new_id >= old_tokenizer.vocab_size  # an appended piece
    parts = [sentencepiece_processor(old_tokenizer).piece_to_id(piece) for piece in ("図", "書", "館")]
    assert len(set(parts)) == 3 and 3 not in parts  # three known pieces (3 is the unknown id)
    for rows, old_rows in ((new_params["embed"], params["embed"]), (output_rows(new_params, new_cfg),
                                                                     output_rows(params, cfg))):
        expected = (old_rows[parts[0]] + old_rows[parts[1]] + old_rows[parts[2]]) / 3
        np.testing.assert_allclose(rows[new_id], expected, rtol=1e-6, atol=1e-8)


def test_every_new_row_is_the_mean_of_the_old_pieces_covering_its_text(expanded):
    old_tokenizer, new_tokenizer, cfg, params, new_cfg, new_params, _ = expanded
    unknown_id = sentencepiece_processor(old_tokenizer).unk_id()
    checked_unknown = 0
    for new_id in range(old_tokenizer.vocab_size, new_tokenizer.vocab_size):
        piece = new_tokenizer.id_to_piece(new_id)
        pieces = old_tokenizer.encode(piece.replace("▁", " "))  # the old model adds no prefix
        assert "".join(old_tokenizer.id_to_piece(i) for i in pieces if i != unknown_id) == piece.replace(
            UNKNOWN_TO_OLD, "")
        known = [i for i in pieces if i != unknown_id]
        checked_unknown += len(known) < len(pieces)
        for rows, old_rows in ((new_params["embed"], params["embed"]), (output_rows(new_params, new_cfg),
                                                                         output_rows(params, cfg))):
            expected = sum(np.asarray(old_rows[i], np.float64) for i in known) / len(known)
            np.testing.assert_allclose(rows[new_id], expected, rtol=1e-5, atol=1e-7)
    assert checked_unknown >= 1  # some appended piece holds the character the old model lacks


def test_logits_of_old_token_text_are_unchanged_for_old_entries(expanded):
    old_tokenizer, new_tokenizer, cfg, params, new_cfg, new_params, _ = expanded
    ids = np.asarray(old_tokenizer.encode("Children read picture books in the quiet room."), np.int32)
    assert ids.max() < old_tokenizer.vocab_size
    before = logits_of(cfg, params, ids)
    after = logits_of(new_cfg, new_params, ids)
    assert after.shape == (len(ids), 384)
    np.testing.assert_allclose(after[:, : old_tokenizer.vocab_size], before[:, : old_tokenizer.vocab_size],
                               rtol=1e-6, atol=1e-6)


def test_a_tokenizer_that_renumbers_old_pieces_is_refused(tokenizers):
    cfg = model_config(256, tie_embeddings=True)
    old_tokenizer, japanese = load_tokenizer(str(tokenizers["old"])), load_tokenizer(str(tokenizers["ja"]))
    bigger_old = model_config(128, tie_embeddings=True)
    with pytest.raises(VocabExpansionError, match="expected more tokens|changes .* old ids"):
        expand_vocabulary(pure_params(cfg), cfg, japanese, old_tokenizer)
    with pytest.raises(VocabExpansionError, match="changes .* old ids"):
        expand_vocabulary(pure_params(bigger_old), bigger_old, old_tokenizer, _renumbered(tokenizers))
    with pytest.raises(VocabExpansionError, match="params\\['embed'\\] has shape"):
        expand_vocabulary(pure_params(cfg), bigger_old, old_tokenizer, load_tokenizer(str(tokenizers["new"])))


def _renumbered(tokenizers):
    """The new model with two old pieces swapped."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizers["new"].read_bytes())
    first, second = proto.pieces[10].piece, proto.pieces[11].piece
    proto.pieces[10].piece, proto.pieces[11].piece = second, first
    path = tokenizers["new"].with_name("renumbered.model")
    path.write_bytes(proto.SerializeToString())
    return load_tokenizer(str(path))


def test_hugging_face_added_tokens_start_from_their_byte_level_pieces(tmp_path):
    import tokenizers as hf

    tokenizer = hf.Tokenizer(hf.models.BPE())
    tokenizer.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(ENGLISH.splitlines(), trainer)
    tokenizer.save(str(tmp_path / "old.json"))
    tokenizer.add_tokens(["図書館", " 勉強"])
    tokenizer.save(str(tmp_path / "new.json"))
    old_tokenizer = load_tokenizer(str(tmp_path / "old.json"))
    new_tokenizer = load_tokenizer(str(tmp_path / "new.json"))
    assert new_tokenizer.vocab_size == old_tokenizer.vocab_size + 2
    cfg = model_config(384, tie_embeddings=True)
    params = pure_params(cfg)
    new_params, new_cfg = expand_vocabulary(params, cfg, old_tokenizer, new_tokenizer)
    assert new_cfg.vocab_size == 384
    for offset, text in enumerate(["図書館", " 勉強"]):
        pieces = old_tokenizer.encode(text)
        assert len(pieces) >= 3  # UTF-8 bytes of kanji, merged or not by the English-trained BPE
        expected = np.asarray(params["embed"], np.float64)[pieces].mean(axis=0)
        new_row = new_params["embed"][old_tokenizer.vocab_size + offset]
        np.testing.assert_allclose(new_row, expected, rtol=1e-6)


def test_expand_vocab_cli_writes_a_checkpoint_for_the_new_tokenizer(tmp_path, tokenizers, capsys):
    config = default_config()
    config.model = model_config(256, tie_embeddings=False)
    params = pure_params(config.model)
    save_params(tmp_path / "old_ckpt", params, config)
    spec = importlib.util.spec_from_file_location("expand_vocab", REPO / "tools" / "expand_vocab.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(["--checkpoint", str(tmp_path / "old_ckpt"), "--old-tokenizer", str(tokenizers["old"]),
                      "--new-tokenizer", str(tokenizers["new"]), "--out", str(tmp_path / "new_ckpt")])
    assert code == 0, capsys.readouterr().err
    new_params, new_config = load_params(tmp_path / "new_ckpt")
    assert new_config.model.vocab_size == 384 and new_config.data.tokenizer == str(tokenizers["new"])
    assert new_params["embed"].shape == (384, 16) and new_params["lm_head"].shape == (16, 384)
    old_size = load_tokenizer(str(tokenizers["old"])).vocab_size
    np.testing.assert_array_equal(new_params["lm_head"][:, :old_size], params["lm_head"][:, :old_size])
    assert "from their old pieces" in capsys.readouterr().out
    code = cli.call(tool.main, ["--checkpoint", str(tmp_path / "old_ckpt"), "--old-tokenizer",
                                str(tokenizers["new"]), "--new-tokenizer", str(tokenizers["old"]), "--out",
                                str(tmp_path / "refused")])
    assert code == 2 and "expected more tokens in the new one" in capsys.readouterr().err
