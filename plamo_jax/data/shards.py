"""The on-disk token shard format written by tools/tokenize_corpus.py and read by the pipeline.

A corpus directory holds `manifest.json` and, per shard, `shard-NNNNN.tokens.npy` (1-D uint16
or uint32, documents back to back, already framed with BOS/EOS), `shard-NNNNN.offsets.npy`
(int64, documents + 1 entries) and `shard-NNNNN.json` (a completion marker). Every file is
written under a temporary name and renamed when complete; the manifest is written last, and
readers only open shards the manifest lists, so an interrupted run is never read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from plamo_jax.data.documents import DocumentPart, TokenDocuments
from plamo_jax.errors import DataError

FORMAT = "plamo_jax.token_shards.v1"
MANIFEST = "manifest.json"
TEMP_MARKER = ".tmp-"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    documents: int
    tokens: int


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _atomic_write(path: Path, write) -> None:
    temp_path = path.with_name(f"{path.name}{TEMP_MARKER}{os.getpid()}")
    with open(temp_path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp_path, path)


def write_json_atomic(path: Path, payload: dict) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1, ensure_ascii=False).encode("utf-8")))


def write_shard(
    directory: Path, index: int, documents: list[np.ndarray], dtype: np.dtype, job_key: str
) -> ShardInfo:
    """Write one shard of framed documents; the marker file appears only after both arrays are complete."""
    name = shard_name(index)
    lengths = np.array([len(doc) for doc in documents], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(documents).astype(dtype) if documents else np.zeros(0, dtype)
    _atomic_write(directory / f"{name}.tokens.npy", lambda f: np.save(f, tokens))
    _atomic_write(directory / f"{name}.offsets.npy", lambda f: np.save(f, offsets))
    info = ShardInfo(name=name, documents=len(documents), tokens=int(offsets[-1]))
    write_json_atomic(directory / f"{name}.json", {"job_key": job_key, **dataclasses.asdict(info)})
    return info


def completed_shard(directory: Path, index: int, job_key: str) -> ShardInfo | None:
    """The shard written earlier by the same job (same inputs and settings), or None."""
    name = shard_name(index)
    marker = directory / f"{name}.json"
    if not marker.is_file():
        return None
    try:
        payload = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if payload.get("job_key") != job_key:
        return None
    if not (directory / f"{name}.tokens.npy").is_file() or not (directory / f"{name}.offsets.npy").is_file():
        return None
    return ShardInfo(name=name, documents=int(payload["documents"]), tokens=int(payload["tokens"]))


def remove_temporary_files(directory: Path) -> int:
    removed = 0
    for path in directory.glob(f"*{TEMP_MARKER}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{str(path)!r} does not exist: {str(directory)!r} is not a finished tokenized corpus "
            "(run tools/tokenize_corpus.py to completion)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{str(path)!r} is not valid JSON: {error}") from error
    if manifest.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} has format {manifest.get('format')!r}; expected {FORMAT!r}")
    return manifest


def open_token_shards(directory: str | Path) -> tuple[TokenDocuments, dict]:
    """Memory-map the shards a manifest lists; offsets are small and read whole."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    parts = []
    for shard in manifest["shards"]:
        tokens_path = directory / f"{shard['name']}.tokens.npy"
        offsets_path = directory / f"{shard['name']}.offsets.npy"
        for path in (tokens_path, offsets_path):
            if not path.is_file():
                raise DataError(f"{str(path)!r} is listed in {MANIFEST} but missing; re-run tokenize_corpus")
        try:
            offsets = np.load(offsets_path)
            tokens = np.load(tokens_path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as error:  # numpy's words for a cut or damaged .npy file
            raise DataError(f"token shard {str(tokens_path)!r} (or its offsets) cannot be read: {error}; "
                            "expected a complete shard (re-run tokenize_corpus)") from None
        if len(offsets) != shard["documents"] + 1 or int(offsets[-1]) != len(tokens):
            raise DataError(
                f"{str(tokens_path)!r} holds {len(tokens)} tokens / {len(offsets) - 1} documents but "
                f"{MANIFEST} says {shard['tokens']} / {shard['documents']}; re-run tokenize_corpus"
            )
        parts.append(DocumentPart(offsets, tokens_path=tokens_path))
    return TokenDocuments(parts), manifest
