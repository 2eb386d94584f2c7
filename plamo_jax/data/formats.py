"""Corpus formats: how one `data.source` entry becomes token documents.

The pipeline packs documents and knows no format; whoever builds it passes the formats it may read
(the language-modelling objective: `text` from here and `chat` from `posttrain/sft.py`). A format
is chosen per corpus by `data.format` or a `name:` prefix on the entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_collections

from plamo_jax.data import hf_datasets, megatron, shards
from plamo_jax.data.documents import TokenDocuments, documents_from_texts
from plamo_jax.data.seqio_source import seqio_documents
from plamo_jax.data.sources import ReadReport, iter_documents
from plamo_jax.data.tokenizer import Tokenizer
from plamo_jax.errors import DataError

DataConfig = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class CorpusRead:
    documents: TokenDocuments
    report: ReadReport
    description: str  # what was read, for the log


@dataclasses.dataclass(frozen=True)
class CorpusFormat:
    """read(path, tokenizer, data config) -> CorpusRead; validate(data config) checks the keys it uses."""

    name: str
    read: Callable[[str, Tokenizer, DataConfig], CorpusRead]
    validate: Callable[[DataConfig], None] = lambda data_config: None


def read_text_corpus(path: str, tokenizer: Tokenizer, data_config: DataConfig) -> CorpusRead:
    """A tokenized corpus directory or a Megatron .bin/.idx pair (memory-mapped), a seqio task, a Hugging
    Face `save_to_disk` directory, or raw files / `builtin` (tokenized)."""
    if path.startswith(megatron.SOURCE_PREFIX):
        return read_megatron_corpus(path.removeprefix(megatron.SOURCE_PREFIX), tokenizer, data_config)
    if path.startswith("seqio:"):
        documents = seqio_documents(path.removeprefix("seqio:"), tokenizer, add_bos=data_config.add_bos,
                                    feature=data_config.text_field)
        return CorpusRead(documents, ReadReport(documents=documents.num_documents), path)
    directory = Path(path)
    if directory.is_dir() and (directory / shards.MANIFEST).is_file():
        documents, manifest = shards.open_token_shards(directory)
        _check_manifest(directory, manifest, tokenizer, data_config)
        report = ReadReport(**manifest.get("read_report", {}))
        return CorpusRead(documents, report, f"{path} ({manifest['documents']} tokenized documents)")
    if directory.is_dir() and any(directory.glob("shard-*.tokens.npy")):
        raise DataError(
            f"data.source entry {path!r} holds token shards but no {shards.MANIFEST}: an unfinished "
            "tokenize_corpus run; re-run it to completion"
        )
    report = ReadReport()
    if hf_datasets.is_saved_dataset(directory):
        documents = hf_datasets.read_saved_dataset(
            directory, tokenizer, text_field=data_config.text_field, add_bos=data_config.add_bos,
            on_bad_input=data_config.on_bad_input, report=report)
        if documents.num_documents == 0:
            raise DataError(f"data.source entry {path!r} yielded no documents: {report.summary()}")
        return CorpusRead(documents, report, f"{path} (Hugging Face dataset: {report.summary()})")
    texts = iter_documents([path], text_field=data_config.text_field, on_bad_input=data_config.on_bad_input,
                           report=report)
    documents = documents_from_texts(texts, tokenizer, data_config.add_bos)
    if documents.num_documents == 0:
        raise DataError(f"data.source entry {path!r} yielded no documents: {report.summary()}")
    return CorpusRead(documents, report, f"{path} ({report.summary()})")


def read_megatron_corpus(prefix: str, tokenizer: Tokenizer, data_config: DataConfig) -> CorpusRead:
    """`PREFIX.bin` / `PREFIX.idx` as Megatron-LM wrote them; token ids must fit data.tokenizer."""
    report = ReadReport()
    documents = megatron.open_megatron_corpus(prefix, report=report, on_bad_input=data_config.on_bad_input)
    megatron.check_token_ids(documents, tokenizer.vocab_size, f"Megatron dataset {prefix!r}")
    description = (f"{megatron.SOURCE_PREFIX}{prefix} ({documents.num_documents} documents, "
                   f"{documents.total_tokens} tokens; {report.summary()})")
    return CorpusRead(documents, report, description)


def _check_manifest(path: Path, manifest: dict, tokenizer: Tokenizer, data_config: DataConfig) -> None:
    if manifest["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise DataError(
            f"{str(path)!r} was tokenized with {manifest['tokenizer']!r} "
            f"({manifest['tokenizer_fingerprint']}) but data.tokenizer={data_config.tokenizer!r} "
            f"is {tokenizer.fingerprint()}; expected the same tokenizer"
        )
    if bool(manifest["add_bos"]) != bool(data_config.add_bos):
        raise DataError(
            f"{str(path)!r} was tokenized with add_bos={manifest['add_bos']} but data.add_bos="
            f"{data_config.add_bos}; expected the same (re-run tokenize_corpus or change data.add_bos)"
        )


def _validate_text(data_config: DataConfig) -> None:
    if not data_config.text_field:
        raise DataError("data.text_field is empty; expected the name of the text field")


TEXT = CorpusFormat("text", read_text_corpus, _validate_text)
TEXT_ONLY: Mapping[str, CorpusFormat] = {TEXT.name: TEXT}
