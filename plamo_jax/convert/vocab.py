"""Vocabulary expansion for continual pre-training (Swallow): new tokens start from their old pieces.

The new tokenizer must extend the old one (every old id keeps its piece; new pieces are appended, as
Swallow appended Japanese pieces to Llama 2's SentencePiece model). For each new token, the text it
stands for is split by the OLD tokenizer and its input embedding (and, untied, its output embedding)
becomes the mean of those pieces' rows. Old rows are copied unchanged, so a model fed only old ids
gives the same logits for old-vocabulary entries. Unknown pieces (characters the old tokenizer lacks,
without byte fallback) are left out of a new token's mean. The vocabulary is padded to a multiple of
`pad_multiple`; padding rows, and new tokens whose text the old tokenizer cannot split (control or
partial-byte tokens), get the mean of all old rows and are counted in the report.

The text of a SentencePiece piece is the piece with '▁' read as a space; it is split by the old model
with the dummy prefix and whitespace clean-up switched off, so exactly that text is covered. For a
Hugging Face tokenizer the text is the decoder's output for the single token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np

from plamo_jax.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer, Tokenizer
from plamo_jax.errors import ConversionError

_MAX_EXAMPLES = 20


class VocabExpansionError(ConversionError):
    """Tokenizers or parameters that cannot be expanded as asked; the message says which and why."""


@dataclasses.dataclass
class VocabExpansionReport:
    old_tokens: int = 0
    new_tokens: int = 0
    model_vocab_before: int = 0
    model_vocab_after: int = 0
    mean_of_pieces: int = 0  # new tokens initialised from their old pieces
    mean_of_all: int = 0  # new tokens without a usable split: the mean of all old rows
    unknown_pieces_dropped: int = 0  # new tokens whose split held the old unknown piece (left out)
    padding_rows: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)  # first few mean_of_all tokens

    def summary(self) -> str:
        text = (f"tokenizer {self.old_tokens} -> {self.new_tokens} tokens, model vocabulary "
                f"{self.model_vocab_before} -> {self.model_vocab_after}; {self.mean_of_pieces} new tokens "
                f"from their old pieces, {self.mean_of_all} from the mean of all old rows, "
                f"{self.padding_rows} padding rows; {self.unknown_pieces_dropped} splits held unknown pieces")
        return text + (f" (e.g. {', '.join(self.examples[:5])})" if self.examples else "")


@dataclasses.dataclass
class _Vocabulary:
    """A tokenizer seen as pieces by id, each piece's text (None: not text) and a text -> ids splitter."""

    pieces: list[str]
    texts: list[str | None]
    split: Callable[[str], list[int]]
    unknown_id: int | None = None  # pieces of text the tokenizer does not cover carry no meaning


def _sentencepiece_vocabulary(tokenizer: SentencePieceTokenizer) -> _Vocabulary:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer.path).read_bytes())
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    texts: list[str | None] = []
    for piece in proto.pieces:
        if piece.type in (kinds.NORMAL, kinds.USER_DEFINED):
            texts.append(piece.piece.replace("▁", " "))
        elif piece.type == kinds.BYTE and int(piece.piece[1:-1], 16) < 0x80:  # "<0x41>": ASCII is text
            texts.append(chr(int(piece.piece[1:-1], 16)))
        else:
            texts.append(None)
    # Split exactly the given text: no '▁' prepended, inner and edge spaces kept.
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    unknown = [i for i, piece in enumerate(proto.pieces) if piece.type == kinds.UNKNOWN]
    pieces = [piece.piece for piece in proto.pieces]
    return _Vocabulary(pieces, texts, lambda text: list(processor.encode(text, out_type=int)),
                       unknown[0] if unknown else None)


def _huggingface_vocabulary(tokenizer: HuggingFaceTokenizer) -> _Vocabulary:
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(str(tokenizer.path))
    size = hf.get_vocab_size(with_added_tokens=True)
    specials = {token_id for token_id, added in hf.get_added_tokens_decoder().items() if added.special}
    pieces = [hf.id_to_token(token_id) or "" for token_id in range(size)]
    texts: list[str | None] = []
    for token_id, piece in enumerate(pieces):
        text = None if token_id in specials else hf.decode([token_id], skip_special_tokens=False)
        partial_bytes = text is not None and "\ufffd" in text and "\ufffd" not in piece
        texts.append(None if not text or partial_bytes else text)
    unknown_token = getattr(hf.model, "unk_token", None)
    unknown_id = hf.token_to_id(unknown_token) if unknown_token else None
    return _Vocabulary(pieces, texts, lambda text: list(hf.encode(text, add_special_tokens=False).ids),
                       unknown_id)


def _byte_vocabulary(tokenizer: ByteTokenizer) -> _Vocabulary:
    offset = tokenizer.byte_offset
    pieces = [f"<special {i}>" for i in range(offset)] + [f"<0x{b:02X}>" for b in range(256)]
    texts = [None] * offset + [chr(b) if b < 0x80 else None for b in range(256)]
    return _Vocabulary(pieces, texts, tokenizer.encode)


def tokenizer_vocabulary(tokenizer: Tokenizer) -> _Vocabulary:
    if isinstance(tokenizer, SentencePieceTokenizer):
        return _sentencepiece_vocabulary(tokenizer)
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return _huggingface_vocabulary(tokenizer)
    if isinstance(tokenizer, ByteTokenizer):
        return _byte_vocabulary(tokenizer)
    raise VocabExpansionError(f"tokenizer of type {type(tokenizer).__name__} is not supported; expected a "
                              "SentencePiece, Hugging Face or byte tokenizer from load_tokenizer")


def _check_extends(old: _Vocabulary, new: _Vocabulary) -> None:
    if len(new.pieces) <= len(old.pieces):
        raise VocabExpansionError(f"the new tokenizer has {len(new.pieces)} tokens, the old one "
                                  f"{len(old.pieces)}; expected more tokens in the new one")
    changed = [i for i, piece in enumerate(old.pieces) if new.pieces[i] != piece]
    if changed:
        shown = ", ".join(f"id {i}: {old.pieces[i]!r} -> {new.pieces[i]!r}" for i in changed[:5])
        raise VocabExpansionError(f"the new tokenizer changes {len(changed)} old ids ({shown}); expected it "
                                  "to keep every old id's piece and append new pieces after them")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def expanded_rows(old_rows_VD: np.ndarray, new_vocab_size: int, old_tokens: int,
                  splits: list[list[int] | None], model_vocab: int) -> np.ndarray:
    """[model_vocab, D]: old rows copied, row old_tokens + k = mean of rows splits[k] (None: all-old mean)."""
    old_rows = np.asarray(old_rows_VD)
    mean_of_all = old_rows[:old_tokens].astype(np.float64).mean(axis=0)
    rows = np.empty((model_vocab, old_rows.shape[1]), dtype=old_rows.dtype)
    rows[:old_tokens] = old_rows[:old_tokens]
    for offset, piece_ids in enumerate(splits):
        mean = mean_of_all if piece_ids is None else old_rows[piece_ids].astype(np.float64).mean(axis=0)
        rows[old_tokens + offset] = mean
    rows[new_vocab_size:] = mean_of_all
    return rows


def expand_vocabulary(
    params: dict,
    model_cfg: ml_collections.ConfigDict,
    old_tokenizer: Tokenizer,
    new_tokenizer: Tokenizer,
    *,
    pad_multiple: int = 128,
    report: VocabExpansionReport | None = None,
) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, model config) for `new_tokenizer`; `embed` [V, D] and, untied, `lm_head` [D, V] grow.

    Other parameters are returned as they are (the same objects). `report`, when given, is filled in.
    """
    if pad_multiple < 1:
        raise VocabExpansionError(f"pad_multiple={pad_multiple}; expected a positive integer")
    old, new = tokenizer_vocabulary(old_tokenizer), tokenizer_vocabulary(new_tokenizer)
    _check_extends(old, new)
    old_tokens, new_tokens = len(old.pieces), len(new.pieces)
    embed = np.asarray(params["embed"])
    if embed.shape[0] != model_cfg.vocab_size or embed.shape[0] < old_tokens:
        raise VocabExpansionError(
            f"params['embed'] has shape {embed.shape} with model.vocab_size={model_cfg.vocab_size}; expected "
            f"[model.vocab_size, d_model] with at least the old tokenizer's {old_tokens} rows"
        )
    report = report if report is not None else VocabExpansionReport()
    report.old_tokens, report.new_tokens, report.model_vocab_before = old_tokens, new_tokens, embed.shape[0]
    splits: list[list[int] | None] = []
    for token_id in range(old_tokens, new_tokens):
        text = new.texts[token_id]
        piece_ids = old.split(text) if text else []
        if old.unknown_id is not None and old.unknown_id in piece_ids:
            piece_ids = [i for i in piece_ids if i != old.unknown_id]
            report.unknown_pieces_dropped += 1
        if piece_ids and all(0 <= i < old_tokens for i in piece_ids):
            splits.append(piece_ids)
            report.mean_of_pieces += 1
        else:
            splits.append(None)
            report.mean_of_all += 1
            if len(report.examples) < _MAX_EXAMPLES:
                report.examples.append(f"id {token_id} {new.pieces[token_id]!r}")
    model_vocab = max(_round_up(new_tokens, pad_multiple), embed.shape[0])
    report.model_vocab_after, report.padding_rows = model_vocab, model_vocab - new_tokens

    expanded = dict(params)
    expanded["embed"] = expanded_rows(embed, new_tokens, old_tokens, splits, model_vocab)
    if not model_cfg.tie_embeddings:
        lm_head = np.asarray(params["lm_head"])
        if lm_head.shape != embed.shape[::-1]:
            raise VocabExpansionError(
                f"params['lm_head'] has shape {lm_head.shape}; expected {embed.shape[::-1]} (the transpose "
                "of embed, as model.tie_embeddings=False)"
            )
        expanded["lm_head"] = expanded_rows(lm_head.T, new_tokens, old_tokens, splits, model_vocab).T.copy()
    new_cfg = model_cfg.copy_and_resolve_references()
    new_cfg.vocab_size = model_vocab
    return expanded, new_cfg
