"""Reading raw documents (JSONL, Parquet, plain text, the bundled corpus) with bad-input accounting.

Every record that cannot become a document is counted under a reason and, with
`on_bad_input="fail"`, raises a DataError naming the file and line. Nothing is dropped silently.
Plain-text files hold documents separated by blank lines.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from plamo_jax.errors import DataError

BUILTIN_CORPUS = Path(__file__).parent / "corpus" / "builtin.jsonl"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md")
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
ON_BAD_INPUT_CHOICES = ("skip", "fail")
_MAX_EXAMPLES = 20
_TEXT_DOCUMENT_SEPARATOR = re.compile(rb"\r?\n[ \t]*\r?\n")


@dataclasses.dataclass
class ReadReport:
    """Counts of documents read and of records skipped, by reason, with the first few locations."""

    documents: int = 0
    text_bytes: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def bad(self, reason: str, where: str, detail: str, on_bad_input: str) -> None:
        message = f"{where}: {reason}: {detail}"
        if on_bad_input == "fail":
            raise DataError(f"{message} (set data.on_bad_input='skip' to count and skip such records)")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(message)

    def merge(self, other: ReadReport) -> None:
        self.documents += other.documents
        self.text_bytes += other.text_bytes
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.examples.extend(other.examples[: max(0, _MAX_EXAMPLES - len(self.examples))])

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.documents} documents, nothing skipped"
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items()))
        return (
            f"{self.documents} documents, skipped {self.skipped_total} ({reasons}); first: {self.examples[0]}"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_on_bad_input(on_bad_input: str) -> None:
    if on_bad_input not in ON_BAD_INPUT_CHOICES:
        raise DataError(f"data.on_bad_input={on_bad_input!r}; expected one of {ON_BAD_INPUT_CHOICES}")


def list_input_files(path: str | Path, report: ReadReport, on_bad_input: str) -> list[Path]:
    """The readable files named by `path` (a file, or a directory searched recursively, sorted)."""
    if str(path) == "builtin":
        return [BUILTIN_CORPUS]
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
        if not files:
            report.bad("no_input_files", str(path), f"no files ending in {SUPPORTED_SUFFIXES}", on_bad_input)
        return files
    if not path.exists():
        report.bad("missing_file", str(path), "no such file or directory", on_bad_input)
        return []
    if path.suffix not in SUPPORTED_SUFFIXES:
        report.bad(
            "unsupported_format", str(path), f"expected a name ending in {SUPPORTED_SUFFIXES}", on_bad_input
        )
        return []
    return [path]


def accept_text(text: str, where: str, report: ReadReport, on_bad_input: str) -> bool:
    """Count a document of `text`, or an empty one as bad (`empty_document`); whether to keep it."""
    if not text.strip():
        report.bad("empty_document", where, "the text is empty or only whitespace", on_bad_input)
        return False
    report.documents += 1
    report.text_bytes += len(text.encode("utf-8"))
    return True


def iter_json_records(path: Path, report: ReadReport, on_bad_input: str) -> Iterator[tuple[str, object]]:
    """(`file:line`, parsed record) for every JSONL line; undecodable lines are counted as bad."""
    with open(path, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            if not raw_line.strip():
                continue  # blank separator lines are not records
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                report.bad("invalid_utf8", where, str(error), on_bad_input)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                report.bad("bad_json", where, str(error), on_bad_input)
                continue
            yield where, record


def _read_jsonl(path: Path, text_field: str, report: ReadReport, on_bad_input: str) -> Iterator[str]:
    for where, record in iter_json_records(path, report, on_bad_input):
        if not isinstance(record, dict) or text_field not in record:
            report.bad("missing_field", where, f"no {text_field!r} field (data.text_field)", on_bad_input)
            continue
        text = record[text_field]
        if not isinstance(text, str):
            report.bad("not_text", where, f"field {text_field!r} is {type(text).__name__}", on_bad_input)
            continue
        if accept_text(text, where, report, on_bad_input):
            yield text


def _read_parquet(path: Path, text_field: str, report: ReadReport, on_bad_input: str) -> Iterator[str]:
    import pyarrow.parquet

    try:
        parquet_file = pyarrow.parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises several unrelated types for corrupt files
        report.bad("unreadable_file", str(path), str(error), on_bad_input)
        return
    if text_field not in parquet_file.schema_arrow.names:
        rows = parquet_file.metadata.num_rows
        report.bad(
            "missing_field",
            str(path),
            f"no column {text_field!r} (data.text_field) in {rows} rows",
            on_bad_input,
        )
        return
    row_number = 0
    for batch in parquet_file.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row_number += 1
            where = f"{path}:row {row_number}"
            if value is None:
                report.bad("missing_field", where, f"column {text_field!r} is null", on_bad_input)
                continue
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as error:
                    report.bad("invalid_utf8", where, str(error), on_bad_input)
                    continue
            if not isinstance(value, str):
                report.bad(
                    "not_text", where, f"column {text_field!r} holds {type(value).__name__}", on_bad_input
                )
                continue
            if accept_text(value, where, report, on_bad_input):
                yield value


def _read_text(path: Path, report: ReadReport, on_bad_input: str) -> Iterator[str]:
    chunks = _TEXT_DOCUMENT_SEPARATOR.split(path.read_bytes())
    for document_number, chunk in enumerate(chunks, start=1):
        if not chunk.strip():
            continue  # leading / trailing blank lines
        where = f"{path}:document {document_number}"
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as error:
            report.bad("invalid_utf8", where, str(error), on_bad_input)
            continue
        if accept_text(text, where, report, on_bad_input):
            yield text


def read_file_documents(path: Path, text_field: str, report: ReadReport, on_bad_input: str) -> Iterator[str]:
    if path.suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text_field, report, on_bad_input)
    elif path.suffix in PARQUET_SUFFIXES:
        yield from _read_parquet(path, text_field, report, on_bad_input)
    else:
        yield from _read_text(path, report, on_bad_input)


def iter_documents(
    paths: Iterable[str | Path], *, text_field: str, on_bad_input: str, report: ReadReport
) -> Iterator[str]:
    """Document texts from files and directories in order, recording skips in `report`."""
    check_on_bad_input(on_bad_input)
    for path in paths:
        for file_path in list_input_files(path, report, on_bad_input):
            yield from read_file_documents(file_path, text_field, report, on_bad_input)


def read_builtin_documents() -> list[str]:
    """The bundled bilingual corpus (original Japanese and English prose) as a list of texts."""
    report = ReadReport()
    return list(iter_documents(["builtin"], text_field="text", on_bad_input="fail", report=report))
