"""An optional source that reads documents from a registered seqio Task or Mixture.

seqio (with TensorFlow, about 2.4 GB) is an optional extra and is imported only when a
`seqio:<task>[/<split>]` entry appears in data.source. Documents are taken from a text feature
and tokenized with the pipeline's tokenizer, so seqio's own vocabulary plays no part.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from plamo_jax.data.documents import TokenDocuments, documents_from_texts
from plamo_jax.data.errors import DataError
from plamo_jax.data.tokenizer import Tokenizer

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


def iter_seqio_texts(spec: str, *, feature: str = "text", max_documents: int | None = None) -> Iterator[str]:
    """Texts of `feature` from the task's examples, in the task's own order (no shuffling)."""
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
        yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def seqio_documents(
    spec: str, tokenizer: Tokenizer, *, add_bos: bool, feature: str = "text"
) -> TokenDocuments:
    """The task's documents tokenized in memory, framed like every other corpus."""
    return documents_from_texts(iter_seqio_texts(spec, feature=feature), tokenizer, add_bos)
