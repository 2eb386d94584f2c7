"""Benchmark examples from a JSONL file, every record checked: a benchmark must not shrink silently."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from plamo_jax.errors import DataError


def read_jsonl_examples(source: str, kind: str, check: Callable[[object], str | None],
                        expected: str) -> list[dict]:
    """The records of `source`; a missing file, a bad line (check(record) says why) or no record at all
    is a DataError naming the file and line, with `expected` describing a good record."""
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{kind} file {source!r} does not exist; expected a JSONL file")
    examples = []
    with open(path, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            if not raw_line.strip():
                continue
            try:
                record = json.loads(raw_line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise DataError(f"{path}:{line_number}: not a JSON record: {error}") from None
            problem = check(record)
            if problem is not None:
                raise DataError(f"{path}:{line_number}: {problem}; expected {expected}")
            examples.append(record)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples
