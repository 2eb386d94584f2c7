"""Hugging Face `datasets` directories written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.

A data.source entry that is such a directory (it holds `state.json` and `dataset_info.json`, or a
`DatasetDict`'s `dataset_dict.json`) is read with `datasets.load_from_disk`, so whatever `datasets`
itself would see (its Arrow files, any `select`/`shuffle` already applied) is what trains. A
DatasetDict gives its `train` split (or its only one); name another split's subdirectory to read it.

The column data.text_field holds either text (tokenized here with data.tokenizer, like a JSONL
corpus: small and medium corpora, tokenized in memory at start) or token ids (a list of integers per
row, e.g. a `map`ped tokenizer's `input_ids`; they must come from data.tokenizer's vocabulary). Either
way documents are framed with BOS (data.add_bos) and EOS like every other corpus; bad rows are counted
by reason in the read report, as for JSONL.

`datasets` is an optional extra (`pip install 'plamo_jax[datasets]'`), imported only for such an entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from plamo_jax.data.documents import TokenDocuments, documents_from_token_lists, frame_document
from plamo_jax.data.sources import ReadReport, accept_text
from plamo_jax.data.tokenizer import Tokenizer, encode_to_array
from plamo_jax.errors import DataError

DATASET_FILES = ("state.json", "dataset_info.json")
DATASET_DICT_FILE = "dataset_dict.json"
EXTRA = "datasets"
_BATCH_ROWS = 1024


def is_saved_dataset(path: str | Path) -> bool:
    """Whether `path` is a directory written by `save_to_disk` (a Dataset or a DatasetDict)."""
    directory = Path(path)
    if not directory.is_dir():
        return False
    return (directory / DATASET_DICT_FILE).is_file() or all((directory / f).is_file() for f in DATASET_FILES)


def import_datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            "data.source names a Hugging Face datasets directory, but `datasets` is not installed; it is "
            f"an optional extra: pip install 'plamo_jax[{EXTRA}]' (or: pip install datasets)"
        ) from error
    return datasets


def load_split(path: str | Path) -> Any:
    """The `datasets.Dataset` saved at `path` (a DatasetDict's train split, or its only split)."""
    datasets = import_datasets()
    directory = Path(path)
    index = directory / DATASET_DICT_FILE
    if index.is_file():
        try:
            splits = json.loads(index.read_text(encoding="utf-8"))["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{str(index)!r} is not a DatasetDict index: {error}") from None
        if "train" not in splits and len(splits) != 1:
            raise DataError(f"{str(directory)!r} is a DatasetDict with splits {splits} and no 'train'; "
                            f"expected one split's directory, e.g. {str(directory / splits[0])!r}")
        directory = directory / ("train" if "train" in splits else splits[0])
    try:
        return datasets.load_from_disk(str(directory))
    except (FileNotFoundError, ValueError, OSError, json.JSONDecodeError) as error:
        raise DataError(f"{str(directory)!r} cannot be read by datasets.load_from_disk: {error}") from None


def read_saved_dataset(path: str | Path, tokenizer: Tokenizer, *, text_field: str, add_bos: bool,
                       on_bad_input: str, report: ReadReport) -> TokenDocuments:
    """The framed documents of the column `text_field`: text is tokenized, token ids are taken as they are."""
    dataset = load_split(path)
    if text_field not in dataset.column_names:
        raise DataError(f"{str(path)!r} has no column {text_field!r} (data.text_field); it has "
                        f"{dataset.column_names}")
    framed = []
    column = dataset.select_columns([text_field]).with_format("arrow")
    for batch_index, table in enumerate(column.iter(batch_size=_BATCH_ROWS)):
        for offset, value in enumerate(table.column(0).to_pylist()):
            where = f"{path}:row {batch_index * _BATCH_ROWS + offset}"
            token_ids = _row_tokens(value, where, tokenizer, text_field, on_bad_input, report)
            if token_ids is not None:
                framed.append(frame_document(token_ids, tokenizer, add_bos))
    return documents_from_token_lists(framed)


def _row_tokens(value: object, where: str, tokenizer: Tokenizer, text_field: str, on_bad_input: str,
                report: ReadReport) -> np.ndarray | None:
    if value is None:
        report.bad("missing_field", where, f"column {text_field!r} is null", on_bad_input)
        return None
    if isinstance(value, str):
        return encode_to_array(tokenizer, value) if accept_text(value, where, report, on_bad_input) else None
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if not value:
            report.bad("empty_document", where, f"column {text_field!r} holds no token ids", on_bad_input)
            return None
        token_ids = np.asarray(value, np.int64)
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= tokenizer.vocab_size:
            bad = high if high >= tokenizer.vocab_size else low
            raise DataError(f"{where}: token id {bad} in column {text_field!r}; expected ids in "
                            f"[0, {tokenizer.vocab_size}) of data.tokenizer")
        report.documents += 1
        return token_ids.astype(np.int32)
    report.bad("not_text", where, f"column {text_field!r} holds {type(value).__name__}; expected text or a "
               "list of token ids", on_bad_input)
    return None
