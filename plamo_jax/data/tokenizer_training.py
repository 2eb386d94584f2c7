"""Training a SentencePiece tokenizer on the user's documents (tools/train_tokenizer.py).

Special ids are fixed to match the byte tokenizer (pad 0, bos 1, eos 2, unk 3). Text is not
normalised and whitespace is kept, so decode(encode(text)) == text for any text; byte fallback
covers characters outside the vocabulary, which matters for the long tail of Japanese kanji.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

from plamo_jax.data.sources import ReadReport, iter_documents
from plamo_jax.errors import DataError

MODEL_TYPES = ("bpe", "unigram")
SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}


@dataclasses.dataclass(frozen=True)
class TokenizerTrainingSettings:
    vocab_size: int = 8000
    model_type: str = "unigram"
    user_defined_symbols: tuple[str, ...] = ()
    character_coverage: float = 0.9995  # below 1.0 so rare kanji fall back to bytes
    max_sentence_length: int = 16384  # bytes; longer lines are cut by the line splitter below
    input_sentence_size: int = 2_000_000  # lines sampled for training (0 = all)
    num_threads: int = 2
    text_field: str = "text"
    on_bad_input: str = "skip"


def _lines(documents: Iterator[str], max_bytes: int) -> Iterator[str]:
    """SentencePiece trains on lines; documents are split at newlines and overly long lines are cut."""
    for document in documents:
        for line in document.splitlines():
            if not line.strip():
                continue
            encoded = line.encode("utf-8")
            while len(encoded) > max_bytes:
                head = encoded[:max_bytes].decode("utf-8", errors="ignore")
                yield head
                encoded = encoded[len(head.encode("utf-8")) :]
            if encoded:
                yield encoded.decode("utf-8")


def train_sentencepiece(
    inputs: Sequence[str], model_prefix: str | Path, settings: TokenizerTrainingSettings
) -> tuple[Path, ReadReport]:
    """Train on documents from `inputs`; writes `<model_prefix>.model` and `.vocab`."""
    import sentencepiece

    if settings.model_type not in MODEL_TYPES:
        raise DataError(f"model_type={settings.model_type!r}; expected one of {MODEL_TYPES}")
    minimum = len(SPECIAL_IDS) + len(settings.user_defined_symbols) + 256 + 1
    if settings.vocab_size < minimum:
        raise DataError(
            f"vocab_size={settings.vocab_size}; expected >= {minimum} (specials, user symbols, bytes)"
        )
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    report = ReadReport()
    documents = iter_documents(
        inputs, text_field=settings.text_field, on_bad_input=settings.on_bad_input, report=report
    )
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_lines(documents, settings.max_sentence_length),
            model_prefix=str(model_prefix),
            vocab_size=settings.vocab_size,
            model_type=settings.model_type,
            character_coverage=settings.character_coverage,
            byte_fallback=True,
            user_defined_symbols=list(settings.user_defined_symbols),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=settings.max_sentence_length,
            input_sentence_size=settings.input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=settings.num_threads,
            minloglevel=2,
            **SPECIAL_IDS,
        )
    except RuntimeError as error:
        raise DataError(f"SentencePiece training on {list(inputs)} failed: {error}") from error
    if report.documents == 0:
        raise DataError(f"no documents in {list(inputs)}: {report.summary()}")
    return model_prefix.with_suffix(".model"), report
