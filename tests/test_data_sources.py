"""Reading raw documents: formats, and bad input counted and reported (skip) or raised (fail)."""

from __future__ import annotations

import json

import pyarrow
import pyarrow.parquet
import pytest
from helpers import make_train_iterator

from plamo_jax.data.config import data_defaults
from plamo_jax.data.sources import ReadReport, iter_documents
from plamo_jax.errors import DataError

GOOD = ["最初の文書です。", "second document", "三番目\n複数行"]


@pytest.fixture()
def messy_jsonl(tmp_path):
    lines = [
        json.dumps({"text": GOOD[0]}, ensure_ascii=False).encode(),
        b'{"text": "unterminated',  # line 2: bad json
        json.dumps({"body": "no text field"}).encode(),  # line 3
        json.dumps({"text": GOOD[1]}).encode(),
        b"",  # a blank line is not a record
        '{"text": "caf\u00e9"}'.encode("latin-1"),  # line 6: not UTF-8
        json.dumps({"text": "   "}).encode(),  # line 7: empty document
        json.dumps({"text": 42}).encode(),  # line 8: not text
        json.dumps({"text": GOOD[2]}, ensure_ascii=False).encode(),
        json.dumps(["a", "list"]).encode(),  # line 10: not an object
    ]
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def read(paths, on_bad_input="skip", text_field="text"):
    report = ReadReport()
    texts = list(iter_documents(paths, text_field=text_field, on_bad_input=on_bad_input, report=report))
    return texts, report


def test_skip_counts_every_bad_record(messy_jsonl, tmp_path):
    texts, report = read([messy_jsonl, tmp_path / "missing.jsonl"])
    assert texts == GOOD
    assert report.documents == 3
    assert report.skipped == {
        "bad_json": 1,
        "missing_field": 2,
        "invalid_utf8": 1,
        "empty_document": 1,
        "not_text": 1,
        "missing_file": 1,
    }
    assert f"{messy_jsonl}:2: bad_json" in report.examples[0]
    assert any("missing.jsonl" in example for example in report.examples)
    assert "skipped 7" in report.summary()


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        (b"{oops", "bad_json"),
        (b'{"other": 1}', "missing_field"),
        (b'{"text": "\xff\xfe"}', "invalid_utf8"),
        (b'{"text": ""}', "empty_document"),
    ],
)
def test_fail_raises_with_file_and_line(tmp_path, bad_line, reason):
    path = tmp_path / "one.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + bad_line + b"\n")
    with pytest.raises(DataError, match=f"one.jsonl:2: {reason}"):
        read([path], on_bad_input="fail")


def test_fail_on_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothing_here.jsonl: missing_file"):
        read([tmp_path / "nothing_here.jsonl"], on_bad_input="fail")


def test_parquet_and_text_files(tmp_path):
    table = pyarrow.table({"content": [GOOD[0], None, GOOD[1], ""]})
    pyarrow.parquet.write_table(table, tmp_path / "a.parquet")
    texts, report = read([tmp_path / "a.parquet"], text_field="content")
    assert texts == GOOD[:2]
    assert report.skipped == {"missing_field": 1, "empty_document": 1}
    _, report = read([tmp_path / "a.parquet"], text_field="text")
    assert report.skipped == {"missing_field": 1} and "no column 'text'" in report.examples[0]

    text_file = tmp_path / "docs.txt"
    text_file.write_bytes("一つ目\n同じ文書\n\n二つ目\n  \n\xff三つ目".encode() + b"\n\n\xff\xfe\n")
    texts, report = read([text_file])
    assert texts == ["一つ目\n同じ文書", "二つ目", "\xff三つ目"]
    assert report.skipped == {"invalid_utf8": 1}


def test_directory_input_reads_supported_files_in_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "b"}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("c")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    (tmp_path / "notes.csv").write_text("ignored")
    texts, report = read([tmp_path])
    assert texts == ["a", "b", "c"] and report.skipped == {}


def test_pipeline_reports_skips_and_fails_cleanly(messy_jsonl):
    config = data_defaults()
    config.source = str(messy_jsonl)
    iterator = make_train_iterator(config, seq_len=8, global_batch_size=2, seed=0)
    assert iterator.read_report.documents == 3 and iterator.read_report.skipped_total == 6
    assert iterator.stats()["corpora"][0]["read_report"]["skipped"]["bad_json"] == 1
    iterator.close()
    config.on_bad_input = "fail"
    with pytest.raises(DataError, match="messy.jsonl:2: bad_json"):
        make_train_iterator(config, seq_len=8, global_batch_size=2, seed=0)


def test_pipeline_with_no_usable_document_says_why(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n")
    config = data_defaults()
    config.source = str(path)
    with pytest.raises(DataError, match="yielded no documents.*empty_document=1"):
        make_train_iterator(config, seq_len=8, global_batch_size=2, seed=0)
