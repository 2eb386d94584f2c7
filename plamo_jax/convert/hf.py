"""Hugging Face conversion of whole checkpoints: Orbax <-> safetensors + config.json + tokenizer files.

The format modules (convert/formats.py) map tensors and config fields; safetensors_io writes and
reads the files. Our checkpoints stack each parameter over layers, so the unit read from an Orbax
checkpoint is one stacked parameter: host memory stays near the largest stacked parameter (plus, on
import, the arrays placed on host-backed devices such as CPUs). A lazily read checkpoint
(`LazyParams`) holds one stacked parameter at a time when the format exports parameter-major (PLaMo 2
exports layer by layer and relies on the LazyParams cache instead).
"""

from __future__ import annotations

import collections
import json
import logging
import resource
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import ml_dtypes
import numpy as np
from tokenizers import Tokenizer

from plamo_jax.convert import formats
from plamo_jax.convert.config_json import architecture_of, read_hf_config
from plamo_jax.convert.safetensors_io import SafetensorsReader, SafetensorsWriter
from plamo_jax.data.tokenizer import tokenizer_from_config
from plamo_jax.errors import ConversionError
from plamo_jax.train import checkpoint as ckpt
from plamo_jax.train.run import build_model

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
# Copied from the original config.json when converting back, since our model config does not hold them.
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
OUTPUT_DTYPES = {"fp32": np.dtype(np.float32), "float32": np.dtype(np.float32),
                 "bf16": np.dtype(ml_dtypes.bfloat16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_TORCH_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16"}


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


# -- config, tokenizer and generation files --------------------------------------------------------

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
    module = formats.format_for_export(model_cfg, fmt)
    hf_cfg = dict(module.hf_config(model_cfg))
    hf_cfg.update(token_ids or {})
    original = {}
    if assets_dir is not None and (Path(assets_dir) / "config.json").is_file():
        original = read_hf_config(assets_dir)
        hf_cfg.update({key: original[key] for key in PASSTHROUGH_KEYS if key in original})
    if max_position_embeddings is not None and "max_position_embeddings" not in original:
        hf_cfg["max_position_embeddings"] = int(max_position_embeddings)
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = _TORCH_DTYPE_NAMES[out_dtype]

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"--out {out_dir} is not an empty directory; expected a new one (nothing is "
                              "overwritten)")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ConversionError(f"--tokenizer {tokenizer} does not exist; expected a tokenizer directory or "
                              "file")
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
    module = formats.module_for_architecture(architecture_of(hf_cfg, where), where)
    overrides = module.model_overrides(hf_cfg)
    config = base_config.copy_and_resolve_references()
    for key, value in overrides.items():
        if key not in config.model:
            raise ConversionError(f"{module.__name__}.model_overrides returned unknown model key {key!r}")
        setattr(config.model, key, value)
    return config, module


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


def import_hf(hf_dir: str | Path, config, devices=None) -> tuple[dict, Any]:
    """(params placed in their shardings on config.mesh over `devices`, config) from a HF model directory.

    One HF tensor (or one stacked parameter) is on the host at a time; `jax.make_array_from_callback`
    hands each device only its slice.
    """
    hf_dir = Path(hf_dir)
    config, module = model_config_from_hf(hf_dir, config)
    setup = build_model(config, devices).setup
    flat_abstract, flat_shardings = _flatten(setup.abstract_params), _flatten(setup.param_shardings)
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

def checkpoint_to_hf(checkpoint: str | Path, out_dir: str | Path, *, step: int | None = None,
                     dtype: str = "bfloat16", fmt: str | None = None, tokenizer: str | Path | None = None,
                     max_shard_bytes: int = 5 * 2**30) -> dict:
    """Export a training or parameters-only checkpoint; parameters are read one stacked leaf at a time."""
    checkpoint = Path(checkpoint)
    config = ckpt.load_config(checkpoint, step)
    assets = ckpt.checkpoint_root(checkpoint) / ckpt.ASSETS_DIR
    if tokenizer is None and not assets.is_dir():
        source = str(config.data.tokenizer)
        if source and Path(source).exists():
            tokenizer = source
    seq_len = config.train.seq_len
    return export_hf(lazy_checkpoint_params(checkpoint, step), config.model, out_dir, fmt=fmt, dtype=dtype,
                     assets_dir=assets if assets.is_dir() else None, tokenizer=tokenizer,
                     max_position_embeddings=seq_len, token_ids=special_token_ids(config.data),
                     max_shard_bytes=max_shard_bytes)


def special_token_ids(data_config) -> dict[str, int]:
    """bos / eos / pad ids of the tokenizer the run trained with (byte, SentencePiece or HF)."""
    tokenizer = tokenizer_from_config(data_config)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.pad_id}
    return {key: int(value) for key, value in ids.items() if value is not None and value >= 0}


def hf_to_checkpoint(hf_dir: str | Path, out_dir: str | Path, config) -> Path:
    """Import a HF directory into a parameters-only checkpoint, each tensor placed in its sharding.

    config: our full config (a ConfigDict); its `model` section is replaced from config.json and its `mesh`
    section decides the layout the arrays are created in.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"--out {out_dir} is not empty; expected a new directory (nothing is "
                              "overwritten)")
    params, config = import_hf(hf_dir, config)
    step_dir = ckpt.save_params(out_dir, params, config)
    copy_hf_assets(hf_dir, out_dir / ckpt.ASSETS_DIR)
    return step_dir
