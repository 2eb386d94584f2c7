"""An optional source that reads documents from a registered seqio Task or Mixture.

seqio (with TensorFlow, about 2.4 GB) is an optional extra and is imported only when a
`seqio:<task>[/<split>]` entry appears in data.source. The feature named by data.text_field is
either already tokenized by the task (integer ids, e.g. from a seqio.SentencePieceVocabulary; they
must come from the same model as data.tokenizer) or raw text, which the pipeline's tokenizer encodes.
Either way documents are framed (BOS, EOS) like every other corpus.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from plamo_jax.data.documents import TokenDocuments, documents_from_token_lists, frame_document
from plamo_jax.data.tokenizer import Tokenizer, encode_to_array
from plamo_jax.errors import DataError

SEQIO_EXTRA = "seqio"
MISSING_SEQIO_MESSAGE = (
    "data.source names a seqio task, but seqio is not installed. It is an optional extra (seqio + "
    f"TensorFlow, about 2.4 GB): pip install 'plamo_jax[{SEQIO_EXTRA}]' (or: pip install seqio)"
)


def import_seqio() -> Any:
    try:
        import seqio
    except ImportError as error:
        raise ImportError(MISSING_SEQIO_MESSAGE) from error
    return seqio


def parse_seqio_spec(spec: str) -> tuple[str, str]:
    """`task` or `task/split` (default split: train)."""
    name, _, split = spec.partition("/")
    if not name:
        raise DataError(f"data.source entry 'seqio:{spec}' names no task; expected 'seqio:<task>[/<split>]'")
    return name, split or "train"


def iter_seqio_features(
    spec: str, *, feature: str = "text", max_documents: int | None = None
) -> Iterator[str | np.ndarray]:
    """`feature` of the task's examples (text, or an int token array), in the task's own order."""
    seqio = import_seqio()
    name, split = parse_seqio_spec(spec)
    try:
        provider = seqio.get_mixture_or_task(name)
    except ValueError as error:
        raise DataError(f"seqio task or mixture {name!r} (data.source) is not registered: {error}") from error
    dataset = provider.get_dataset(sequence_length=None, split=split, shuffle=False)
    for index, example in enumerate(dataset.as_numpy_iterator()):
        if max_documents is not None and index >= max_documents:
            return
        if feature not in example:
            raise DataError(
                f"seqio task {name!r} example {index} has no feature {feature!r}; it has {sorted(example)}"
            )
        value = example[feature]
        if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.integer):
            yield value
        else:
            yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def seqio_documents(
    spec: str, tokenizer: Tokenizer, *, add_bos: bool, feature: str = "text"
) -> TokenDocuments:
    """The task's documents, tokenized here when the task gives text, framed like every other corpus."""
    framed = []
    for value in iter_seqio_features(spec, feature=feature):
        token_ids = value if isinstance(value, np.ndarray) else encode_to_array(tokenizer, value)
        if token_ids.size and int(token_ids.max()) >= tokenizer.vocab_size:
            raise DataError(
                f"seqio task {spec!r} feature {feature!r} has token id {int(token_ids.max())}, outside the "
                f"vocabulary of data.tokenizer ({tokenizer.vocab_size}); expected the task's vocabulary "
                "to be data.tokenizer's model"
            )
        framed.append(frame_document(token_ids, tokenizer, add_bos))
    return documents_from_token_lists(framed)
