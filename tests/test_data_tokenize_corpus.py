"""tools/tokenize_corpus.py: shards equal to in-memory tokenization, idempotent, no half-written shards."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import make_train_iterator

from plamo_jax import cli
from plamo_jax.data import shards, tokenize_job
from plamo_jax.data.batch import FIELDS as BATCH_KEYS
from plamo_jax.data.config import data_defaults
from plamo_jax.data.sources import read_builtin_documents
from plamo_jax.data.tokenize_job import TokenizeSettings, tokenize_corpus
from plamo_jax.data.tokenizer import SentencePieceTokenizer
from plamo_jax.data.tokenizer_training import TokenizerTrainingSettings, train_sentencepiece
from plamo_jax.errors import DataError


def load_tool(name: str):
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tokenize_cli = load_tool("tokenize_corpus")

SMALL_SHARDS = TokenizeSettings(shard_bytes=4000)


def framed_bytes(text: str) -> list[int]:
    return [1] + [b + 3 for b in text.encode("utf-8")] + [2]


def snapshot(directory) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(directory.iterdir())}


def test_shards_hold_every_document_in_order(tmp_path):
    result = tokenize_corpus(["builtin"], tmp_path / "out", SMALL_SHARDS, show_progress=False)
    texts = read_builtin_documents()
    assert result.documents == len(texts) and result.shards > 3 and not result.up_to_date
    documents, manifest = shards.open_token_shards(tmp_path / "out")
    assert manifest["dtype"] == "uint16" and manifest["tokens"] == sum(len(framed_bytes(t)) for t in texts)
    for index, text in enumerate(texts):
        assert documents.document(index).tolist() == framed_bytes(text)


def test_pipeline_reads_shards_like_raw_text(tmp_path):
    tokenize_corpus(["builtin"], tmp_path / "out", SMALL_SHARDS, show_progress=False)
    from_raw, from_shards = data_defaults(), data_defaults()
    from_shards.source = str(tmp_path / "out")
    raw = make_train_iterator(from_raw, seq_len=32, global_batch_size=4, seed=9)
    sharded = make_train_iterator(from_shards, seq_len=32, global_batch_size=4, seed=9)
    for _ in range(5):
        want, got = next(raw), next(sharded)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])
    raw.close()
    sharded.close()


def test_pipeline_refuses_shards_from_another_framing(tmp_path):
    tokenize_corpus(["builtin"], tmp_path / "out", TokenizeSettings(add_bos=False), show_progress=False)
    config = data_defaults()
    config.source = str(tmp_path / "out")
    with pytest.raises(DataError, match="data.add_bos"):
        make_train_iterator(config, seq_len=8, global_batch_size=2, seed=0)


def test_sentencepiece_shards_and_tokenizer_mismatch(tmp_path):
    model_path, _ = train_sentencepiece(
        ["builtin"], tmp_path / "spm", TokenizerTrainingSettings(vocab_size=1000)
    )
    settings = TokenizeSettings(tokenizer=str(model_path), shard_bytes=8000)
    result = tokenize_corpus(["builtin"], tmp_path / "sp_out", settings, show_progress=False)
    tokenizer = SentencePieceTokenizer(model_path)
    documents, _ = shards.open_token_shards(tmp_path / "sp_out")
    for index, text in enumerate(read_builtin_documents()):
        assert documents.document(index).tolist() == [1, *tokenizer.encode(text), 2]
    config = data_defaults()
    config.source = str(result.output_dir)
    config.tokenizer = str(model_path)
    iterator = make_train_iterator(config, seq_len=16, global_batch_size=2, seed=0)
    assert next(iterator)["input_ids"].max() < 1000
    iterator.close()
    config.tokenizer = "byte"
    with pytest.raises(DataError, match="expected the same tokenizer"):
        make_train_iterator(config, seq_len=16, global_batch_size=2, seed=0)


def test_rerun_is_a_no_op(tmp_path):
    tokenize_corpus(["builtin"], tmp_path / "out", SMALL_SHARDS, show_progress=False)
    before = snapshot(tmp_path / "out")
    again = tokenize_corpus(["builtin"], tmp_path / "out", SMALL_SHARDS, show_progress=False)
    assert again.up_to_date and again.documents == len(read_builtin_documents())
    assert snapshot(tmp_path / "out") == before


def test_changed_settings_rebuild_and_drop_stale_shards(tmp_path):
    first = tokenize_corpus(["builtin"], tmp_path / "out", SMALL_SHARDS, show_progress=False)
    second = tokenize_corpus(
        ["builtin"], tmp_path / "out", TokenizeSettings(shard_bytes=20_000), show_progress=False
    )
    assert not second.up_to_date and second.shards < first.shards
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"manifest.json"} | {
        f"{shards.shard_name(i)}{suffix}"
        for i in range(second.shards)
        for suffix in (".json", ".tokens.npy", ".offsets.npy")
    }


def test_interrupted_run_leaves_nothing_readable_and_resumes(tmp_path, monkeypatch):
    output = tmp_path / "out"
    real_write = shards.write_shard

    def write_then_crash(directory, index, documents, dtype, job_key):
        if index == 2:
            # Simulate a kill in the middle of writing shard 2: a temp file and no marker.
            (directory / f"{shards.shard_name(index)}.tokens.npy{shards.TEMP_MARKER}999").write_bytes(
                b"partial"
            )
            raise KeyboardInterrupt
        return real_write(directory, index, documents, dtype, job_key)

    monkeypatch.setattr(tokenize_job.shards, "write_shard", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(["builtin"], output, SMALL_SHARDS, show_progress=False)
    assert not (output / "manifest.json").exists()
    config = data_defaults()
    config.source = str(output)
    with pytest.raises(DataError, match="unfinished tokenize_corpus run"):
        make_train_iterator(config, seq_len=8, global_batch_size=2, seed=0)

    monkeypatch.setattr(tokenize_job.shards, "write_shard", real_write)
    finished = snapshot(output)
    resumed = tokenize_corpus(["builtin"], output, SMALL_SHARDS, show_progress=False)
    assert resumed.reused_shards == 2  # shards 0 and 1 were complete and are not rewritten
    assert not list(output.glob(f"*{shards.TEMP_MARKER}*"))
    for name in ("shard-00000.tokens.npy", "shard-00001.tokens.npy"):
        assert snapshot(output)[name] == finished[name]
    clean = tokenize_corpus(["builtin"], tmp_path / "clean", SMALL_SHARDS, show_progress=False)
    for index in range(clean.shards):
        name = f"{shards.shard_name(index)}.tokens.npy"
        np.testing.assert_array_equal(np.load(output / name), np.load(tmp_path / "clean" / name))


def test_worker_processes_give_identical_shards(tmp_path):
    inline = tokenize_corpus(["builtin"], tmp_path / "inline", SMALL_SHARDS, show_progress=False)
    parallel = tokenize_corpus(
        ["builtin"], tmp_path / "parallel", SMALL_SHARDS, num_workers=2, show_progress=False
    )
    assert parallel.shards == inline.shards
    for index in range(inline.shards):
        for suffix in (".tokens.npy", ".offsets.npy"):
            name = f"{shards.shard_name(index)}{suffix}"
            np.testing.assert_array_equal(
                np.load(tmp_path / "parallel" / name), np.load(tmp_path / "inline" / name)
            )


def test_cli_reports_skips_and_errors(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"text": "ok"}\n{bad\n{"text": ""}\n')
    assert (
        tokenize_cli.main([str(source), "--output", str(tmp_path / "out"), "--workers", "0", "--no_progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "1 documents" in out and "bad_json=1" in out and "empty_document=1" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["read_report"]["skipped"] == {"bad_json": 1, "empty_document": 1}
    code = cli.call(tokenize_cli.main,
        [
            str(source),
            "--output",
            str(tmp_path / "out2"),
            "--workers",
            "0",
            "--no_progress",
            "--on_bad_input",
            "fail",
        ]
    )
    assert code == 2 and "in.jsonl:2: bad_json" in capsys.readouterr().err
    assert (
        cli.call(tokenize_cli.main, [str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "o3"),
                                     "--no_progress"])
        == 2
    )
    assert "missing_file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o3" / "manifest.json")
