"""Tokenizing raw corpora into token shards in parallel worker processes (tools/tokenize_corpus.py).

Documents are read in input order and cut into shards of about `shard_bytes` of text; worker
processes tokenize and frame them (optional BOS, EOS) and write each shard atomically. The job
key hashes the inputs (paths, sizes, modification times), the tokenizer and the settings: a re-run
with the same key reuses every finished shard (so an interrupted run resumes) and, once the
manifest exists, does nothing at all.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from plamo_jax.data import shards
from plamo_jax.data.documents import frame_document
from plamo_jax.data.sources import ReadReport, check_on_bad_input, list_input_files, read_file_documents
from plamo_jax.data.tokenizer import Tokenizer, encode_to_array, load_tokenizer
from plamo_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class TokenizeSettings:
    tokenizer: str = "byte"
    bos_token: str = ""
    eos_token: str = ""
    pad_token: str = ""
    text_field: str = "text"
    add_bos: bool = True
    shard_bytes: int = 64 << 20
    on_bad_input: str = "skip"


@dataclasses.dataclass
class TokenizeResult:
    output_dir: Path
    documents: int
    tokens: int
    shards: int
    reused_shards: int
    input_bytes: int
    seconds: float
    up_to_date: bool
    read_report: ReadReport

    @property
    def megabytes_per_second(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


# --- worker side: one tokenizer per process, loaded once ---------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _load_worker_tokenizer(settings: TokenizeSettings) -> Tokenizer:
    return load_tokenizer(
        settings.tokenizer,
        bos_token=settings.bos_token,
        eos_token=settings.eos_token,
        pad_token=settings.pad_token,
    )


def _init_worker(settings: TokenizeSettings) -> None:
    global _worker_tokenizer
    _worker_tokenizer = _load_worker_tokenizer(settings)


def _tokenize_shard(
    output_dir: Path, index: int, texts: list[str], settings: TokenizeSettings, dtype: str, job_key: str
) -> shards.ShardInfo:
    tokenizer = _worker_tokenizer or _load_worker_tokenizer(settings)
    documents = [
        frame_document(encode_to_array(tokenizer, text), tokenizer, settings.add_bos) for text in texts
    ]
    return shards.write_shard(output_dir, index, documents, np.dtype(dtype), job_key)


# --- main side -----------------------------------------------------------------------------------


def _input_files(inputs: list[str], settings: TokenizeSettings, report: ReadReport) -> list[Path]:
    files = []
    for path in inputs:
        files.extend(list_input_files(path, report, settings.on_bad_input))
    return files


def _job_key(files: list[Path], tokenizer: Tokenizer, settings: TokenizeSettings) -> str:
    description = {
        "format": shards.FORMAT,
        "tokenizer": tokenizer.fingerprint(),
        "settings": dataclasses.asdict(settings),
        "inputs": [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in files],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def _chunks(
    files: list[Path], settings: TokenizeSettings, report: ReadReport, progress
) -> Iterator[list[str]]:
    """Lists of document texts of about shard_bytes each, in input order."""
    chunk, chunk_bytes = [], 0
    for path in files:
        for text in read_file_documents(path, settings.text_field, report, settings.on_bad_input):
            chunk.append(text)
            chunk_bytes += len(text.encode("utf-8"))
            if chunk_bytes >= settings.shard_bytes:
                yield chunk
                chunk, chunk_bytes = [], 0
        progress.update(path.stat().st_size)
    if chunk:
        yield chunk


class _NoProgress:
    def update(self, _amount: int) -> None:
        pass

    def close(self) -> None:
        pass


def tokenize_corpus(
    inputs: list[str],
    output_dir: str | Path,
    settings: TokenizeSettings,
    *,
    num_workers: int = 0,
    show_progress: bool = True,
) -> TokenizeResult:
    """Tokenize `inputs` (files or directories of .jsonl / .parquet / .txt) into `output_dir`."""
    check_on_bad_input(settings.on_bad_input)
    if settings.shard_bytes < 1:
        raise DataError(f"shard_bytes={settings.shard_bytes}; expected >= 1")
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _load_worker_tokenizer(settings)
    report = ReadReport()
    files = _input_files(inputs, settings, report)
    if not files:
        raise DataError(f"no readable input among {inputs}: {report.summary()}")
    job_key = _job_key(files, tokenizer, settings)
    input_bytes = sum(path.stat().st_size for path in files)
    manifest_path = output_dir / shards.MANIFEST
    if manifest_path.is_file():
        manifest = shards.read_manifest(output_dir)
        if manifest.get("job_key") == job_key:
            return TokenizeResult(
                output_dir=output_dir,
                documents=manifest["documents"],
                tokens=manifest["tokens"],
                shards=len(manifest["shards"]),
                reused_shards=len(manifest["shards"]),
                input_bytes=input_bytes,
                seconds=time.perf_counter() - started,
                up_to_date=True,
                read_report=ReadReport(**manifest["read_report"]),
            )
        manifest_path.unlink()  # the old corpus is being replaced; never leave a manifest over new shards
    shards.remove_temporary_files(output_dir)
    dtype = shards.token_dtype(tokenizer.vocab_size).name

    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=input_bytes, unit="B", unit_scale=True, desc="tokenize")
    else:
        progress = _NoProgress()
    infos: dict[int, shards.ShardInfo] = {}
    reused = 0
    executor = None
    if num_workers > 0:
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=num_workers,
            mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded parent
            initializer=_init_worker,
            initargs=(settings,),
        )
    pending: set[concurrent.futures.Future] = set()
    try:
        for index, texts in enumerate(_chunks(files, settings, report, progress)):
            done = shards.completed_shard(output_dir, index, job_key)
            if done is not None and done.documents == len(texts):
                infos[index] = done
                reused += 1
                continue
            if executor is None:
                infos[index] = _tokenize_shard(output_dir, index, texts, settings, dtype, job_key)
                continue
            pending.add(executor.submit(_tokenize_shard, output_dir, index, texts, settings, dtype, job_key))
            if len(pending) >= 2 * num_workers:  # bound the texts held in memory
                finished, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in finished:
                    info = future.result()
                    infos[int(info.name.split("-")[1])] = info
        for future in concurrent.futures.as_completed(pending):
            info = future.result()
            infos[int(info.name.split("-")[1])] = info
    finally:
        progress.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    if not infos:
        raise DataError(f"no documents in {inputs}: {report.summary()}")

    ordered = [infos[index] for index in range(len(infos))]
    _remove_stale_shards(output_dir, len(ordered))
    manifest = {
        "format": shards.FORMAT,
        "job_key": job_key,
        "tokenizer": settings.tokenizer,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "add_bos": settings.add_bos,
        "dtype": dtype,
        "documents": sum(info.documents for info in ordered),
        "tokens": sum(info.tokens for info in ordered),
        "input_bytes": input_bytes,
        "inputs": [str(path) for path in files],
        "shards": [dataclasses.asdict(info) for info in ordered],
        "read_report": report.to_dict(),
    }
    shards.write_json_atomic(manifest_path, manifest)
    return TokenizeResult(
        output_dir=output_dir,
        documents=manifest["documents"],
        tokens=manifest["tokens"],
        shards=len(ordered),
        reused_shards=reused,
        input_bytes=input_bytes,
        seconds=time.perf_counter() - started,
        up_to_date=False,
        read_report=report,
    )


def _remove_stale_shards(output_dir: Path, shard_count: int) -> None:
    """Shard files numbered past the new count belong to an older, larger corpus."""
    for path in output_dir.glob("shard-*"):
        try:
            index = int(path.name.split("-")[1].split(".")[0])
        except ValueError:
            continue
        if index >= shard_count:
            path.unlink(missing_ok=True)
