"""Hugging Face conversion driver, independent of the model family.

Each format module (`llama`, `qwen3`, `plamo2`, `mixtral`, `qwen3_moe`) provides:

    ARCHITECTURE: str                                     # e.g. "LlamaForCausalLM"
    hf_config(model_cfg) -> dict                          # config.json contents
    model_overrides(hf_config: dict) -> dict              # our `model` fields; ValueError names bad fields
    export_tensors(params, model_cfg) -> Iterator[(hf_name, np.ndarray)]
    import_params(read, model_cfg) -> Iterator[("blocks/attn/q_proj", stacked np.ndarray)]

This module writes and reads safetensors (sharded, with an index), config.json, generation_config.json
and tokenizer files one tensor at a time. Our checkpoints stack each parameter over layers, so the unit
read from an Orbax checkpoint is one stacked parameter: host memory stays near the largest stacked
parameter (plus, on import, the arrays placed on host-backed devices such as CPUs). Modules should
export parameter-major (all layers of one stacked parameter, then the next) so that a lazily read
checkpoint (`LazyParams`) only holds one stacked parameter at a time (PLaMo 2 exports layer by layer
and relies on the LazyParams cache instead).
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import resource
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import ml_dtypes
import numpy as np

log = logging.getLogger(__name__)

FORMAT_MODULES = {
    "llama": "plamo_jax.convert.llama",
    "qwen3": "plamo_jax.convert.qwen3",
    "plamo2": "plamo_jax.convert.plamo2",
    "mixtral": "plamo_jax.convert.mixtral",
    "qwen3_moe": "plamo_jax.convert.qwen3_moe",
}
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
# Copied from the original config.json when converting back, since our model config does not hold them.
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
# Keys every transformers config may carry that say nothing about the weights' meaning.
GENERIC_CONFIG_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "max_position_embeddings", "initializer_range", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "tie_word_embeddings", "attention_dropout", "pretraining_tp", "_attn_implementation_autoset",
    "auto_map", "quantization_config_applied", "tokenizer_class", "finetuning_task", "prefix",
    "task_specific_params", "add_cross_attention", "tf_legacy_loss", "use_bfloat16",
    "_from_model_config",
})

_DTYPE_CODES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in _DTYPE_CODES.items()}
OUTPUT_DTYPES = {"fp32": np.dtype(np.float32), "float32": np.dtype(np.float32),
                 "bf16": np.dtype(ml_dtypes.bfloat16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_TORCH_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16"}


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, key or tensor and what was expected."""


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's VmHWM starts afresh at exec; ru_maxrss (the fallback) would carry over the peak of a large
    parent that forked this process.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- format modules --------------------------------------------------------------------------------

def format_module(name: str) -> ModuleType:
    if name not in FORMAT_MODULES:
        raise ConversionError(f"format {name!r} is unknown; expected one of {sorted(FORMAT_MODULES)}")
    return importlib.import_module(FORMAT_MODULES[name])


def available_formats() -> dict[str, ModuleType]:
    """Format modules that exist in this installation (others may still be in development)."""
    modules = {}
    for name, module_path in FORMAT_MODULES.items():
        try:
            modules[name] = importlib.import_module(module_path)
        except ModuleNotFoundError as error:
            if error.name != module_path:
                raise
    return modules


def module_for_architecture(architecture: str, where: str = "config.json") -> ModuleType:
    modules = available_formats()
    for module in modules.values():
        if module.ARCHITECTURE == architecture:
            return module
    known = sorted(module.ARCHITECTURE for module in modules.values())
    raise ConversionError(f"{where}: architecture {architecture!r} is not supported; expected one of {known}")


def default_format(model_cfg) -> str:
    """The HF format a model config exports to when none is named."""
    if model_cfg.family == "dense":
        return "qwen3" if model_cfg.qk_norm else "llama"
    if model_cfg.family == "hybrid":
        return "plamo2"
    if model_cfg.family == "moe":
        return "qwen3_moe" if model_cfg.qk_norm else "mixtral"
    raise ConversionError(f"config key model.family={model_cfg.family!r} has no Hugging Face format")


# -- helpers for format modules --------------------------------------------------------------------

def check_config_keys(hf_config: Mapping, handled: Iterable[str], where: str) -> None:
    """Raise naming every config key that is neither generic nor handled by the format module."""
    unknown = sorted(set(hf_config) - GENERIC_CONFIG_KEYS - set(handled))
    if unknown:
        raise ConversionError(
            f"{where}: config fields {unknown} are not understood by this converter; converting would "
            "silently change the model, so nothing was written"
        )


def require_value(hf_config: Mapping, key: str, allowed: Iterable[Any], where: str) -> None:
    """Raise when a key is present with a value our model cannot represent."""
    allowed = list(allowed)
    if key in hf_config and hf_config[key] not in allowed:
        raise ConversionError(f"{where}: config field {key}={hf_config[key]!r} cannot be mapped; "
                              f"expected one of {allowed}")


def rope_theta_of(hf_config: Mapping, default: float, where: str) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or a top-level `rope_theta`; plain RoPE only."""
    parameters = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling")
    if scaling:
        raise ConversionError(f"{where}: config field rope_scaling={scaling!r} cannot be mapped; "
                              "expected null (plain RoPE)")
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ConversionError(f"{where}: config field rope_parameters.rope_type={rope_type!r} cannot be "
                              "mapped; expected 'default' (plain RoPE)")
    extra = sorted(set(parameters) - {"rope_theta", "rope_type"})
    if extra:
        raise ConversionError(f"{where}: config fields rope_parameters.{extra} cannot be mapped")
    nested, top = parameters.get("rope_theta"), hf_config.get("rope_theta")
    if nested is not None and top is not None and float(nested) != float(top):
        raise ConversionError(f"{where}: rope_parameters.rope_theta={nested} and rope_theta={top} disagree")
    value = nested if nested is not None else top
    return float(default if value is None else value)


def rope_config(theta: float) -> dict:
    """Both RoPE forms: `rope_parameters` for transformers 5, top-level `rope_theta` for other readers."""
    theta = float(theta)
    return {"rope_theta": theta, "rope_parameters": {"rope_theta": theta, "rope_type": "default"}}


# -- safetensors -----------------------------------------------------------------------------------

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
    """Reads tensors (whole or a slice) from a HF directory's safetensors files, without memory-mapping."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        index_path = self.hf_dir / SAFETENSORS_INDEX
        if index_path.is_file():
            files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.hf_dir.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.hf_dir}: no *.safetensors files (only safetensors is read)")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for file_name in files:
            path = self.hf_dir / file_name
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                if entry["dtype"] not in _DTYPE_CODES:
                    raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
                self.entries[name] = (path, entry, 8 + header_len)
        self.read_names: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def _entry(self, name: str):
        if name not in self.entries:
            raise ConversionError(f"{self.hf_dir}: tensor {name!r} is missing from the safetensors files")
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        path, entry, data_start = self._entry(name)
        dtype = _DTYPE_CODES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            array = np.fromfile(f, dtype=dtype, count=count)
        if array.size != count:
            raise ConversionError(f"{path}: tensor {name!r} is truncated ({array.size} of {count} values)")
        self.read_names.add(name)
        return array.reshape(entry["shape"])


# -- config, tokenizer and generation files --------------------------------------------------------

def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} is missing: a Hugging Face model directory needs config.json")
    return json.loads(path.read_text())


def architecture_of(hf_config: Mapping, where: str) -> str:
    architectures = hf_config.get("architectures") or []
    if len(architectures) != 1:
        raise ConversionError(f"{where}: config field architectures={architectures!r}; expected one entry")
    return architectures[0]


def copy_tokenizer_files(source: str | Path, out_dir: str | Path) -> list[str]:
    """Copy HF tokenizer files from a directory (or one tokenizer.json / SentencePiece .model file)."""
    source, out_dir = Path(source), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    if source.is_file():
        target = "tokenizer.model" if source.suffix == ".model" else source.name
        shutil.copyfile(source, out_dir / target)
        return [target]
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
            copied.append(name)
    return copied


def tokenizer_vocab_size(tokenizer: Path) -> int | None:
    """Token count of a HF tokenizer.json (given directly or inside a directory); None if there is none."""
    path = tokenizer if tokenizer.suffix == ".json" else tokenizer / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def generation_config(hf_cfg: Mapping) -> dict:
    return {key: hf_cfg[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
            if hf_cfg.get(key) is not None}


# -- export ----------------------------------------------------------------------------------------

def export_hf(params: Any, model_cfg, out_dir: str | Path, *, fmt: str | None = None,
              dtype: str = "float32", assets_dir: str | Path | None = None,
              tokenizer: str | Path | None = None, max_position_embeddings: int | None = None,
              token_ids: Mapping[str, int] | None = None, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Write a HF model directory from our params (a nested dict of arrays, or `LazyParams`).

    assets_dir: files kept from an earlier import (the original config.json, generation_config.json,
    tokenizer); their token ids, max_position_embeddings and tokenizer are reused. tokenizer: a tokenizer
    directory or file to copy instead. token_ids: bos/eos/pad ids used when no original config gives them.
    Returns the config.json contents written.
    """
    out_dir = Path(out_dir)
    out_dtype = OUTPUT_DTYPES.get(dtype)
    if out_dtype is None:
        raise ConversionError(f"--dtype {dtype!r} is not supported; expected one of {sorted(OUTPUT_DTYPES)}")
    module = format_module(fmt or default_format(model_cfg))
    hf_cfg = dict(module.hf_config(model_cfg))
    hf_cfg.update(token_ids or {})
    original = {}
    if assets_dir is not None and (Path(assets_dir) / "config.json").is_file():
        original = read_hf_config(assets_dir)
        hf_cfg.update({key: original[key] for key in PASSTHROUGH_KEYS if key in original})
    if max_position_embeddings is not None and "max_position_embeddings" not in original:
        hf_cfg["max_position_embeddings"] = int(max_position_embeddings)
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = _TORCH_DTYPE_NAMES[out_dtype]

    if out_dir.exists() and any(out_dir.glob("*.safetensors")):
        raise ConversionError(f"{out_dir} already holds safetensors files; expected a new directory")
    tokenizer_source = Path(tokenizer) if tokenizer is not None else assets_dir
    vocab = tokenizer_vocab_size(Path(tokenizer_source)) if tokenizer_source is not None else None
    if vocab is not None and vocab > model_cfg.vocab_size:
        raise ConversionError(f"the tokenizer in {tokenizer_source} has {vocab} tokens but model.vocab_size="
                              f"{model_cfg.vocab_size}; expected at most the model's vocabulary")
    writer = SafetensorsWriter(out_dir, max_shard_bytes=max_shard_bytes)
    for name, value in module.export_tensors(params, model_cfg):
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating) and value.dtype != ml_dtypes.bfloat16:
            raise ConversionError(f"tensor {name!r} has dtype {value.dtype}; expected floating point")
        writer.add(name, value.astype(out_dtype, copy=False))
    writer.close()

    copied = copy_tokenizer_files(tokenizer_source, out_dir) if tokenizer_source is not None else []
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    generation = generation_config(hf_cfg)
    if assets_dir is not None and (Path(assets_dir) / "generation_config.json").is_file():
        generation = json.loads((Path(assets_dir) / "generation_config.json").read_text())
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s (%d tensors, %.1f MiB, tokenizer files %s)", out_dir, len(writer.weight_map),
             writer.total_bytes / 2**20, copied)
    return hf_cfg


class LazyParams(Mapping):
    """Read-only nested view of a checkpoint's parameters; a leaf is read when it is first indexed.

    Leaves stay cached up to `cache_bytes` (least recently used go first), so a parameter-major export
    holds about one stacked parameter in host memory at a time.
    """

    def __init__(self, metadata: Mapping, load_leaf: Callable[[tuple[str, ...]], np.ndarray],
                 cache_bytes: int, _prefix: tuple[str, ...] = (), _cache=None):
        self._metadata = metadata
        self._load_leaf = load_leaf
        self._cache_bytes = cache_bytes
        self._prefix = _prefix
        self._cache = _cache if _cache is not None else collections.OrderedDict()

    def __getitem__(self, key: str):
        meta = self._metadata[key]
        path = (*self._prefix, key)
        if isinstance(meta, Mapping):
            return LazyParams(meta, self._load_leaf, self._cache_bytes, path, self._cache)
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        value = self._load_leaf(path)
        self._cache[path] = value
        while len(self._cache) > 1 and sum(v.nbytes for v in self._cache.values()) > self._cache_bytes:
            self._cache.popitem(last=False)
        return value

    def __iter__(self):
        return iter(self._metadata)

    def __len__(self) -> int:
        return len(self._metadata)


def lazy_checkpoint_params(checkpoint: str | Path, step: int | None = None) -> LazyParams:
    from plamo_jax.train import checkpoint as ckpt

    metadata = ckpt.params_metadata(checkpoint, step)

    def load_leaf(path: tuple[str, ...]) -> np.ndarray:
        only: dict = {}
        node = only
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = None
        params, _ = ckpt.load_params(checkpoint, step, only=only)
        for key in path:
            params = params[key]
        return params

    sizes = [int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(metadata)]
    return LazyParams(metadata, load_leaf, cache_bytes=max(sizes))


# -- import ----------------------------------------------------------------------------------------

def model_config_from_hf(hf_dir: str | Path, base_config) -> tuple[Any, ModuleType]:
    """(config with `model` overridden from config.json, format module). base_config is left unchanged."""
    hf_cfg = read_hf_config(hf_dir)
    where = str(Path(hf_dir) / "config.json")
    module = module_for_architecture(architecture_of(hf_cfg, where), where)
    overrides = module.model_overrides(hf_cfg)
    config = base_config.copy_and_resolve_references()
    for key, value in overrides.items():
        if key not in config.model:
            raise ConversionError(f"{module.__name__}.model_overrides returned unknown model key {key!r}")
        setattr(config.model, key, value)
    return config, module


def param_shardings(model_cfg, mesh, rules) -> tuple[dict, dict]:
    """(abstract params: ShapeDtypeStruct dict, NamedSharding dict) of a model config on a mesh."""
    from plamo_jax.train.state import setup_model

    setup = setup_model(model_cfg, mesh, rules)
    return setup.abstract_params, setup.param_shardings


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        flat.update(_flatten(value, path) if isinstance(value, Mapping) else {path: value})
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def import_hf(hf_dir: str | Path, config, mesh, rules) -> tuple[dict, Any]:
    """(params placed in their shardings on `mesh`, config) from a HF model directory.

    One HF tensor (or one stacked parameter) is on the host at a time; `jax.make_array_from_callback`
    hands each device only its slice.
    """
    hf_dir = Path(hf_dir)
    config, module = model_config_from_hf(hf_dir, config)
    abstract, shardings = param_shardings(config.model, mesh, rules)
    flat_abstract, flat_shardings = _flatten(abstract), _flatten(shardings)
    reader = SafetensorsReader(hf_dir)
    flat_params: dict[str, jax.Array] = {}
    for path, value in module.import_params(reader.read, config.model):
        if path not in flat_abstract:
            raise ConversionError(f"{module.__name__}: parameter {path!r} does not exist in our model; "
                                  f"expected one of {sorted(flat_abstract)}")
        if path in flat_params:
            raise ConversionError(f"{module.__name__}: parameter {path!r} was imported twice")
        expected = flat_abstract[path]
        value = np.asarray(value)
        if tuple(value.shape) != tuple(expected.shape):
            raise ConversionError(f"{hf_dir}: parameter {path!r} has shape {value.shape} after conversion; "
                                  f"expected {tuple(expected.shape)} from config.json")
        value = value.astype(expected.dtype, copy=False)
        flat_params[path] = jax.make_array_from_callback(
            value.shape, flat_shardings[path], lambda index, value=value: value[index]
        )
        del value
    missing = sorted(set(flat_abstract) - set(flat_params))
    if missing:
        raise ConversionError(f"{module.__name__}: parameters {missing} were not imported from {hf_dir}")
    unused = sorted(set(reader.names()) - reader.read_names)
    if unused:
        raise ConversionError(f"{hf_dir}: tensors {unused[:8]}{'...' if len(unused) > 8 else ''} are not "
                              "used by the conversion; expected every tensor to map to a parameter")
    return _unflatten(flat_params), config


def copy_hf_assets(hf_dir: str | Path, assets_dir: str | Path) -> None:
    """Keep config.json, generation_config.json and the tokenizer next to an imported checkpoint."""
    hf_dir, assets_dir = Path(hf_dir), Path(assets_dir)
    assets_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, assets_dir / name)
    copy_tokenizer_files(hf_dir, assets_dir)


# -- whole conversions (used by tools/convert_checkpoint.py) ---------------------------------------

ASSETS_DIR = "hf_assets"  # next to an imported checkpoint: original config.json, tokenizer, generation config
BYTE_TOKENIZER_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # plamo_jax.data "byte"


def checkpoint_to_hf(checkpoint: str | Path, out_dir: str | Path, *, step: int | None = None,
                     dtype: str = "bfloat16", fmt: str | None = None, tokenizer: str | Path | None = None,
                     max_shard_bytes: int = 5 * 2**30) -> dict:
    """Export a training or parameters-only checkpoint; parameters are read one stacked leaf at a time."""
    from plamo_jax.train import checkpoint as ckpt

    checkpoint = Path(checkpoint)
    config = ckpt.load_config(checkpoint, step)
    root = checkpoint if not ((checkpoint / "state").is_dir() or (checkpoint / "params").is_dir()) \
        else checkpoint.parent
    assets = root / ASSETS_DIR
    if tokenizer is None and not assets.is_dir():
        source = str(config.get("data", {}).get("tokenizer", ""))
        if source and Path(source).exists():
            tokenizer = source
    seq_len = config.get("train", {}).get("seq_len")
    token_ids = BYTE_TOKENIZER_IDS if str(config.get("data", {}).get("tokenizer", "")) == "byte" else None
    return export_hf(lazy_checkpoint_params(checkpoint, step), config.model, out_dir, fmt=fmt, dtype=dtype,
                     assets_dir=assets if assets.is_dir() else None, tokenizer=tokenizer,
                     max_position_embeddings=seq_len, token_ids=token_ids, max_shard_bytes=max_shard_bytes)


def hf_to_checkpoint(hf_dir: str | Path, out_dir: str | Path, config) -> Path:
    """Import a HF directory into a parameters-only checkpoint, each tensor placed in its sharding.

    config: our full config (a ConfigDict); its `model` section is replaced from config.json and its `mesh`
    section decides the layout the arrays are created in.
    """
    from plamo_jax.configuration import mesh_rules
    from plamo_jax.parallel.mesh import make_mesh
    from plamo_jax.train import checkpoint as ckpt

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"--out {out_dir} is not empty; expected a new directory (nothing is "
                              "overwritten)")
    mesh = make_mesh(config.mesh)
    params, config = import_hf(hf_dir, config, mesh, mesh_rules(config))
    step_dir = ckpt.save_params(out_dir, params, config)
    copy_hf_assets(hf_dir, out_dir / ASSETS_DIR)
    return step_dir
