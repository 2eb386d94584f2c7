"""safetensors files: a streaming, sharded writer of our own and the `safetensors` package's reader.

Writing: `safetensors.numpy.save_file` needs a whole shard in host memory (a 5 GiB shard is 5 GiB of
RAM); exports write one stacked parameter at a time instead, so the writer streams each tensor to a
temporary file and puts the header in front when the shard is full (benchmarks/bench_safetensors.py,
peak RSS for a 1 GiB shard: 339 MiB streaming, 1,236 MiB with save_file). Reading uses
`safetensors.safe_open` (memory-mapped, one tensor at a time).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from plamo_jax.errors import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
DTYPE_CODES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


class SafetensorsWriter:
    """Writes tensors one at a time into shards of at most `max_shard_bytes` (a larger tensor gets its own).

    Data goes to a temporary file first; when a shard is full its header (which must list every tensor's
    offsets) is written and the data copied behind it, so no shard is ever held in memory.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[tuple[Path, list[str]]] = []  # (temporary final path, tensor names)
        self.weight_map: dict[str, str] = {}  # tensor name -> file name, complete after close()
        self.tensor_names: set[str] = set()
        self.total_bytes = 0
        self._header: dict[str, dict] = {}
        self._data = None
        self._data_path: Path | None = None
        self._offset = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self.tensor_names:
            raise ConversionError(f"tensor {name!r} was exported twice")
        self.tensor_names.add(name)
        array = np.ascontiguousarray(array)
        if array.dtype not in _CODE_OF_DTYPE:
            raise ConversionError(f"tensor {name!r}: dtype {array.dtype} cannot be written to safetensors")
        if self._data is not None and self._offset and self._offset + array.nbytes > self.max_shard_bytes:
            self._finish_shard()
        if self._data is None:
            self._data_path = self.out_dir / f".shard-{len(self.shards):05d}.data.tmp"
            self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in _finish_shard
            self._offset = 0
        self._header[name] = {"dtype": _CODE_OF_DTYPE[array.dtype], "shape": list(array.shape),
                              "data_offsets": [self._offset, self._offset + array.nbytes]}
        self._data.write(array.reshape(-1).view(np.uint8).data)
        self._offset += array.nbytes
        self.total_bytes += array.nbytes

    def _finish_shard(self) -> None:
        self._data.close()
        header = {"__metadata__": {"format": "pt"}, **self._header}
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8 bytes
        path = self.out_dir / f".shard-{len(self.shards):05d}.safetensors.tmp"
        with open(path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(header_bytes).to_bytes(8, "little"))
            out.write(header_bytes)
            shutil.copyfileobj(data, out, length=16 * 2**20)
        self._data_path.unlink()
        self.shards.append((path, list(self._header)))
        self._header, self._data, self._data_path = {}, None, None

    def close(self) -> list[Path]:
        """Name shards `model-0000i-of-0000n.safetensors` plus an index (one shard: `model.safetensors`)."""
        if self._data is not None:
            self._finish_shard()
        if not self.shards:
            raise ConversionError("no tensors were exported")
        count = len(self.shards)
        written = []
        weight_map = self.weight_map
        for i, (tmp_path, names) in enumerate(self.shards):
            final_name = f"model-{i + 1:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
            os.replace(tmp_path, self.out_dir / final_name)
            written.append(self.out_dir / final_name)
            weight_map.update({name: final_name for name in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return written


class SafetensorsReader:
    """Reads tensors one at a time from a HF directory's safetensors files (with or without an index)."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        index_path = self.hf_dir / SAFETENSORS_INDEX
        if index_path.is_file():
            try:
                files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as error:
                raise ConversionError(f"{index_path}: not a safetensors index ({error!r})") from None
        else:
            files = sorted(p.name for p in self.hf_dir.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.hf_dir}: no *.safetensors files (only safetensors is read)")
        self.entries: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file_name in files:
            path = self.hf_dir / file_name
            with self._open(path) as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    entry = f.get_slice(name)
                    if entry.get_dtype() not in DTYPE_CODES:
                        raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype "
                                              f"{entry.get_dtype()}")
                    self.entries[name] = path
                    self._shapes[name] = tuple(entry.get_shape())
        self.read_names: set[str] = set()

    @staticmethod
    def _open(path: Path):
        if not path.is_file():
            raise ConversionError(f"{path} is missing (listed in {SAFETENSORS_INDEX})")
        try:
            return safe_open(str(path), framework="numpy")
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{path}: not a readable safetensors file ({error})") from None

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        self._path(name)
        return self._shapes[name]

    def _path(self, name: str) -> Path:
        if name not in self.entries:
            raise ConversionError(f"{self.hf_dir}: tensor {name!r} is missing from the safetensors files")
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        path = self._path(name)
        with self._open(path) as f:
            try:
                array = f.get_tensor(name)
            except SafetensorError as error:
                raise ConversionError(f"{path}: tensor {name!r} cannot be read ({error})") from None
        self.read_names.add(name)
        return np.asarray(array)
