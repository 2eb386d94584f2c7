"""Model merging over checkpoints of one architecture: linear, SLERP, task arithmetic, TIES and DARE.

    spec = MergeSpec("ties", density=0.5, scale=1.0)
    merge_checkpoints(["ft_a", "ft_b"], "merged", spec, base="base")

The methods are mergekit's (Goddard et al. 2024), per stacked parameter tensor:

    linear           sum_i w_i theta_i (weights divided by their sum unless normalize=False)
    slerp            spherical interpolation of the two flattened tensors at t (lerp when colinear)
    task_arithmetic  base + scale * sum_i w_i (theta_i - base)
    ties             deltas trimmed to their top `density` by magnitude, a sign elected per element by
                     the sign of the weighted sum, the agreeing deltas' weighted (disjoint) mean:
                     base + scale * merged
    dare             each delta element kept with probability `density` and rescaled by 1 / density
                     (seeded per seed, model and parameter path), then summed as in task_arithmetic
    dare_ties        the DARE drop, then TIES's sign election and disjoint mean

Memory: parameters are read one stacked parameter at a time from every input (`LazyParams` caches
about one leaf each), merged in float32 (or wider) and kept in the first model's dtype. `save_params`
writes one pytree, so the merged model is the one whole model held: peak host memory is one model plus,
per input, one stacked parameter and its temporaries.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections
import numpy as np

from plamo_jax.convert.hf import lazy_checkpoint_params
from plamo_jax.errors import ConfigError, IncompatibleCheckpointError
from plamo_jax.models import registry
from plamo_jax.train import checkpoint as ckpt

log = logging.getLogger(__name__)

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare", "dare_ties")
# Methods that merge differences from a base model.
DELTA_METHODS = ("task_arithmetic", "ties", "dare", "dare_ties")
# Above this cosine SLERP's sin(omega) nears 0 and its coefficients lose precision; lerp is as good.
COLINEAR_COSINE = 0.9995


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """A merge method and its settings (names as the CLI flags: --weights, --t, --density, --lambda)."""

    method: str
    weights: tuple[float, ...] | None = None  # one per model; default equal (linear) or 1 (delta methods)
    normalize: bool = True  # linear only: divide the weights by their sum
    t: float = 0.5  # slerp: 0 gives the first model, 1 the second
    density: float = 1.0  # ties / dare: the kept fraction of each delta
    scale: float = 1.0  # --lambda: the merged delta's factor (delta methods)
    seed: int = 0  # dare


def parse_weights(text: str) -> tuple[float, ...]:
    """`--weights 0.3,0.7` as numbers."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.3,0.7") from None


def check_spec(spec: MergeSpec, num_models: int, has_base: bool) -> tuple[float, ...]:
    """The per-model weights to use; ConfigError names the flag and value of anything that cannot work."""
    if spec.method not in METHODS:
        raise ConfigError(f"--method {spec.method!r} is not a merge method; expected one of {list(METHODS)}")
    if num_models < 1:
        raise ConfigError("no models to merge; expected at least one checkpoint")
    if spec.method == "slerp" and num_models != 2:
        raise ConfigError(f"--method slerp merges exactly 2 models, got {num_models}")
    needs_base = spec.method in DELTA_METHODS
    if needs_base != has_base:
        raise ConfigError(f"--method {spec.method} " + (
            "needs --base (the model the deltas are taken from)" if needs_base else
            f"takes no --base (only {', '.join(DELTA_METHODS)} do)"))
    if not 0.0 <= spec.t <= 1.0:
        raise ConfigError(f"--t {spec.t}: expected an interpolation factor in [0, 1]")
    if not 0.0 < spec.density <= 1.0:
        raise ConfigError(f"--density {spec.density}: expected a kept fraction in (0, 1]")
    if spec.seed < 0:
        raise ConfigError(f"--seed {spec.seed}: expected a non-negative integer")
    if spec.weights is None:
        return (1.0 / num_models if spec.method == "linear" and spec.normalize else 1.0,) * num_models
    weights = tuple(float(w) for w in spec.weights)
    shown = ",".join(f"{w:g}" for w in weights)
    if len(weights) != num_models:
        raise ConfigError(f"--weights {shown}: {len(weights)} values for {num_models} models; expected "
                          "one per model")
    if not all(np.isfinite(weights)):
        raise ConfigError(f"--weights {shown}: expected finite numbers")
    if spec.method == "linear" and spec.normalize:
        total = sum(weights)
        if total == 0:
            raise ConfigError(f"--weights {shown} sum to 0 and cannot be normalised; give other weights "
                              "or --no-normalize")
        weights = tuple(w / total for w in weights)
    return weights


# -- one tensor ------------------------------------------------------------------------------------

def weighted_sum(tensors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    return sum(w * x for w, x in zip(weights, tensors, strict=True))


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation of the flattened tensors, with their own norms (not normalised)."""
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    cosine = float(np.vdot(a, b)) / norms if norms else 1.0  # a zero tensor has no direction: lerp
    if abs(cosine) > COLINEAR_COSINE:
        return (1.0 - t) * a + t * b
    omega = float(np.arccos(cosine))
    # Python floats keep the tensors' dtype, and t = 0 or 1 gives coefficients of exactly 1 and 0.
    first = float(np.sin((1.0 - t) * omega) / np.sin(omega))
    second = float(np.sin(t * omega) / np.sin(omega))
    return first * a + second * b


def trim_to_density(delta: np.ndarray, density: float) -> np.ndarray:
    """The delta with all but its round(density * size) largest-magnitude elements set to 0."""
    if density >= 1.0:
        return delta
    keep = max(1, round(density * delta.size))
    # A stable sort keeps the earlier element of equal magnitudes, so the trim is deterministic.
    largest = np.argsort(-np.abs(delta), axis=None, kind="stable")[:keep]
    kept = np.zeros(delta.size, bool)
    kept[largest] = True
    return np.where(kept.reshape(delta.shape), delta, 0)


def dare_rng(seed: int, model_index: int, path: Sequence[str]) -> np.random.Generator:
    """The drop mask's generator: the same for a seed, model and parameter path in any run or order."""
    return np.random.default_rng([seed, model_index, zlib.crc32("/".join(path).encode())])


def dare_drop(delta: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Each element kept with probability `density` and divided by it (the expected delta is unchanged)."""
    kept = rng.random(delta.shape, dtype=np.float32) < density
    return np.where(kept, delta / density, 0)


def ties_combine(deltas: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Per element: the sign of the weighted sum wins; the weighted mean of the deltas of that sign."""
    weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
    elected = np.sign(sum(weighted))
    agree = [(np.sign(x) == elected) & (x != 0) for x in weighted]
    total = sum(np.where(a, x, 0) for a, x in zip(agree, weighted, strict=True))
    divisor = sum(a.astype(total.dtype) * w for a, w in zip(agree, weights, strict=True))
    # No agreeing delta (all trimmed, or elected sign 0): the element keeps the base value.
    return np.divide(total, divisor, out=np.zeros_like(total), where=divisor != 0)


def merge_tensors(spec: MergeSpec, tensors: Sequence[np.ndarray], base: np.ndarray | None = None,
                  path: Sequence[str] = ()) -> np.ndarray:
    """One parameter merged from the models' `tensors` (and `base`); `path` seeds DARE's drop mask."""
    weights = check_spec(spec, len(tensors), base is not None)
    if spec.method == "linear":
        return weighted_sum(tensors, weights)
    if spec.method == "slerp":
        return slerp(tensors[0], tensors[1], spec.t)
    deltas = [x - base for x in tensors]
    if spec.method == "ties":
        deltas = [trim_to_density(d, spec.density) for d in deltas]
    elif spec.method in ("dare", "dare_ties"):
        deltas = [dare_drop(d, spec.density, dare_rng(spec.seed, i, path)) for i, d in enumerate(deltas)]
    combine = ties_combine if spec.method in ("ties", "dare_ties") else weighted_sum
    return base + spec.scale * combine(deltas, weights)


# -- whole checkpoints -----------------------------------------------------------------------------

def leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in tree.items():
        path = (*prefix, str(key))
        paths.extend(leaf_paths(value, path) if isinstance(value, Mapping) else [path])
    return paths


def _leaf(tree: Mapping, path: Sequence[str]):
    for key in path:
        tree = tree[key]
    return tree


def _shapes(checkpoint: str | Path) -> dict[tuple[str, ...], tuple[int, ...]]:
    metadata = ckpt.params_metadata(checkpoint)
    return {path: tuple(_leaf(metadata, path).shape) for path in leaf_paths(metadata)}


def check_same_architecture(checkpoints: Sequence[str | Path]) -> ml_collections.ConfigDict:
    """The first checkpoint's config, once every other one has its architecture and parameter shapes."""
    first, *others = checkpoints
    config = ckpt.load_config(first)
    shapes = _shapes(first)
    for other in others:
        model = ckpt.load_config(other).model
        differences = registry.architecture_differences(model, config.model)
        if differences:
            raise IncompatibleCheckpointError(
                f"checkpoint {other}: its model differs from the first model's ({first}) in "
                f"{', '.join(differences)}; expected checkpoints of one architecture")
        for key in registry.changed_keys(model, config.model):
            log.warning("model.%s=%r in %s differs from %r in %s; the merge keeps %s's", key, model[key],
                        other, config.model[key], first, first)
        other_shapes = _shapes(other)
        if other_shapes != shapes:
            differing = sorted("/".join(p) for p in set(shapes) | set(other_shapes)
                               if shapes.get(p) != other_shapes.get(p))
            raise IncompatibleCheckpointError(
                f"checkpoint {other} holds parameters of other shapes or names than {first} "
                f"({', '.join(differing[:6])}); expected checkpoints of one architecture")
    return config


def require_empty(directory: str | Path, flag: str) -> None:
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{flag} {directory} is not an empty directory; expected a new one (nothing is "
                          "overwritten)")


def merge_checkpoints(models: Sequence[str | Path], out: str | Path, spec: MergeSpec,
                      base: str | Path | None = None) -> Path:
    """Write the merge of `models` (and `base`) to `out` as a parameters-only checkpoint; its step dir.

    The output carries the first model's config and its hf_assets (original config.json, tokenizer).
    """
    require_empty(out, "--out")
    check_spec(spec, len(models), base is not None)
    sources = [*models, base] if base is not None else list(models)
    config = check_same_architecture(sources)
    readers = [lazy_checkpoint_params(source) for source in sources]
    metadata = ckpt.params_metadata(models[0])
    merged: dict = {}
    for path in leaf_paths(metadata):
        dtype = np.dtype(_leaf(metadata, path).dtype)
        work = np.promote_types(dtype, np.float32)  # bf16 deltas and sums would round away small changes
        tensors = [np.asarray(_leaf(reader, path), work) for reader in readers]
        model_tensors, base_tensor = (tensors[:-1], tensors[-1]) if base is not None else (tensors, None)
        node = merged
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = merge_tensors(spec, model_tensors, base_tensor, path).astype(dtype)
    step_dir = ckpt.save_params(out, merged, config)
    ckpt.carry_assets(models[0], Path(out).absolute())
    return step_dir
