"""Orbax checkpoints: the train state, the data iterator state and the config, saved together per step.

Layout of a training checkpoint directory (one Orbax `CheckpointManager` root):

    <directory>/<step>/state    the train-state pytree (params, opt_state, step, rng), sharded arrays
    <directory>/<step>/data     the data iterator state (JSON)
    <directory>/<step>/config   the run config (JSON)

A parameters-only checkpoint (`save_params`, e.g. written by `tools/convert_checkpoint.py from-hf`) holds
`<step>/params` and `<step>/config` instead. `load_params` reads both kinds.

Orbax writes each step into a temporary directory and renames it when complete, so a step directory that
exists is whole; deletion of old steps happens only after the newer step is committed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from plamo_jax.configuration import default_config
from plamo_jax.errors import CheckpointError, ConfigError, IncompatibleCheckpointError

log = logging.getLogger(__name__)

STATE_ITEM, DATA_ITEM, CONFIG_ITEM, PARAMS_ITEM = "state", "data", "config", "params"
# Beside a checkpoint's steps: an imported model's original config.json, generation config and tokenizer.
ASSETS_DIR = "hf_assets"


def _flat_shapes(tree: Mapping, prefix: str = "") -> dict[str, tuple[int, ...]]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        flat.update(_flat_shapes(value, path) if isinstance(value, Mapping) else {path: tuple(value.shape)})
    return flat


def _config_as_dict(config: Any) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json())
    if isinstance(config, str):
        return json.loads(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a ConfigDict, a JSON string or a dict, got {type(config).__name__}")


def committed_steps(directory: Path) -> list[int]:
    """Committed step numbers under an Orbax root (temporary, unfinished directories are not integers)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


class Checkpointer:
    """Periodic, asynchronous training checkpoints with retention and a fallback on unreadable steps.

    every_steps: save when `step % every_steps == 0` (0 disables the step rule).
    every_minutes: also save when this much wall time passed since the last save (0 disables it).
    Retention: a checkpoint is *vouched for* once a later step was healthy (its loss, computed from
    these parameters or later ones, was finite and no spike; see `vouch`). The newest keep_last
    vouched-for checkpoints are kept, plus every newer one not yet vouched for, plus (keep_every) every
    checkpoint whose step is a multiple of M. So a diverging run never deletes the last good
    checkpoint because of newer bad ones; without `vouch` calls nothing is deleted.
    """

    def __init__(self, directory: str | Path, *, every_steps: int, every_minutes: float = 0.0,
                 keep_last: int = 3, keep_every: int = 0, async_save: bool = True):
        if keep_last < 1:
            raise ConfigError(f"config key checkpoint.keep_last={keep_last}: expected at least 1")
        if every_steps < 0 or every_minutes < 0 or keep_every < 0:
            raise ConfigError(
                f"checkpoint.every_steps={every_steps}, checkpoint.every_minutes={every_minutes}, "
                f"checkpoint.keep_every={keep_every}: expected values >= 0"
            )
        self.directory = Path(directory).absolute()
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.keep_last, self.keep_every = keep_last, keep_every
        self._vouched_below = 0  # checkpoints of steps below this one are vouched for
        self._last_save_time = time.monotonic()
        # Orbax keeps every step; `_apply_retention` decides what goes (Orbax's policies cannot know
        # which checkpoints a later healthy step vouched for).
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM, CONFIG_ITEM)
            )
        except Exception as error:  # noqa: BLE001 - Orbax raises many kinds for an unusable directory
            raise CheckpointError(f"cannot use checkpoint directory {self.directory}: "
                                  f"{type(error).__name__}: {str(error)[:300]}") from None

    # -- saving ---------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        due = bool(self.every_steps) and step % self.every_steps == 0
        if not due and self.every_minutes:
            elapsed = time.monotonic() - self._last_save_time
            due = elapsed >= 60.0 * self.every_minutes
            if jax.process_count() > 1:
                # Clocks differ between hosts; every host must take the same decision (a save is collective).
                due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due

    def maybe_save(self, step: int, state: Any, data_state: dict, config_json: str,
                   force: bool = False) -> bool:
        """Save when due (or when forced). Returns whether a save started.

        With async saving this returns once the arrays are copied to host memory; the write continues in
        the background. A step that is already on disk is not written again.
        """
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            DATA_ITEM: ocp.args.JsonSave(data_state),
            CONFIG_ITEM: ocp.args.JsonSave(_config_as_dict(config_json)),
        })
        with self._writing(f"step {step}"):
            saved = self._manager.save(step, args=args, force=True)
        self._last_save_time = time.monotonic()
        return bool(saved)

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Orbax's write errors (a read-only or full disk, a path that is a file) as one CheckpointError."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - Orbax and the OS raise many kinds; all mean: not saved
            reason = " ".join(str(error).split())[:300]
            raise CheckpointError(f"cannot write checkpoint {what} to {self.directory}: "
                                  f"{type(error).__name__}: {reason}") from None

    def wait_until_finished(self) -> None:
        with self._writing("(background write)"):
            self._manager.wait_until_finished()

    # -- retention ------------------------------------------------------------------------------

    def vouch(self, healthy_step: int) -> None:
        """Step `healthy_step` was healthy: every checkpoint saved before it holds good parameters."""
        self._vouched_below = max(self._vouched_below, int(healthy_step))
        self._apply_retention()

    def vouched_steps(self) -> list[int]:
        return [step for step in self.all_steps() if step < self._vouched_below]

    def _apply_retention(self) -> None:
        if self._manager.is_saving_in_progress():
            return  # decided again at the next vouch, once the write is committed
        vouched = self.vouched_steps()
        keep = set(vouched[-self.keep_last:]) | {s for s in self.all_steps() if s >= self._vouched_below}
        if self.keep_every:
            keep |= {s for s in vouched if s % self.keep_every == 0}
        for step in vouched:
            if step not in keep:
                with self._writing(f"deletion of step {step}"):
                    self._manager.delete(step)

    def close(self) -> None:
        self._manager.close()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # -- restoring ------------------------------------------------------------------------------

    def restore_latest(self, abstract_state: Any, *, accept_data: Callable[[dict], None] | None = None,
                       before: int | None = None, defaults: Mapping[str, Any] | None = None
                       ) -> tuple[Any, dict] | None:
        """(state, data_state) from the newest readable checkpoint, or None when there is none.

        abstract_state: a pytree of jax.ShapeDtypeStruct with `.sharding`; arrays are read straight into
        those shardings, so the mesh may differ from the one that saved. An unreadable checkpoint is skipped
        with a warning and, once an older one restored, moved aside (never deleted) so that its step can be
        written again. A readable checkpoint whose parameter shapes differ from abstract_state (a changed
        model config) is an error, not a reason to fall back.
        accept_data: raises (e.g. DataError) for a data state this run cannot continue; such a
        checkpoint is passed over like an unreadable one. before: only steps below it (a rewind).
        defaults: top-level state entries a checkpoint may predate (e.g. the guard), used when absent.
        """
        leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
        unplaced = [jax.tree_util.keystr(path) for path, leaf in leaves
                    if getattr(leaf, "sharding", None) is None]
        if unplaced:
            raise ValueError(f"abstract_state leaves {unplaced[:5]} have no sharding; expected "
                             "jax.ShapeDtypeStruct(shape, dtype, sharding=...) for every leaf")
        self.wait_until_finished()
        unreadable: list[int] = []
        reasons: list[str] = []
        steps = [s for s in self._manager.all_steps() if before is None or s < before]
        for step in sorted(steps, reverse=True):
            step_dir = self.directory / str(step)
            try:
                self._check_param_shapes(step_dir, abstract_state)
                target = _stored_entries(step_dir, abstract_state, defaults or {})
                restored = self._manager.restore(step, args=ocp.args.Composite(**{
                    STATE_ITEM: ocp.args.StandardRestore(target),
                    DATA_ITEM: ocp.args.JsonRestore(),
                }))
                state, data_state = {**(defaults or {}), **restored[STATE_ITEM]}, restored[DATA_ITEM]
                if data_state is None:
                    raise CheckpointError(f"{step_dir}/{DATA_ITEM} is missing")
                if accept_data is not None:
                    accept_data(data_state)
            except IncompatibleCheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure to read means: try the previous one
                reason = " ".join(str(error).split())[:300]
                log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous checkpoint",
                            step_dir, type(error).__name__, reason)
                unreadable.append(step)
                reasons.append(f"step {step}: {reason}")
                continue
            for bad_step in unreadable:
                self._quarantine(bad_step)
            if unreadable:
                log.warning("restored step %d from %s after skipping unreadable steps %s", step, step_dir,
                            unreadable)
            self._last_save_time = time.monotonic()
            return state, data_state
        if unreadable:
            raise CheckpointError(f"{self.directory}: no checkpoint is readable (steps {unreadable}: "
                                  f"{'; '.join(reasons[:3])}); refusing to start from scratch over them")
        return None

    @staticmethod
    def _check_param_shapes(step_dir: Path, abstract_state: Any) -> None:
        if not isinstance(abstract_state, Mapping) or PARAMS_ITEM not in abstract_state:
            return
        stored = _flat_shapes(params_metadata(step_dir))
        expected = _flat_shapes(abstract_state[PARAMS_ITEM])
        if stored != expected:
            differences = sorted(
                f"{path}: stored {stored.get(path)} vs model {expected.get(path)}"
                for path in set(stored) | set(expected) if stored.get(path) != expected.get(path)
            )
            listed = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
            raise IncompatibleCheckpointError(
                f"{step_dir} holds parameters that do not fit the configured model ({listed}); expected the "
                "model config it was saved with"
            )

    def _quarantine(self, step: int, why: str = "unreadable") -> None:
        """Move a step out of the manager's root (never delete it) so its step number can be saved again."""
        source = self.directory / str(step)
        target = self.directory.parent / f"{self.directory.name}_{why}" / f"{step}_{int(time.time())}"
        if jax.process_index() == 0 and source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
            log.warning("moved %s checkpoint %s to %s", why, source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"plamo_jax_{why}_{step}")
        self._manager.reload()

    def set_aside_after(self, step: int) -> list[int]:
        """Move the checkpoints after `step` aside (a rewind goes back to `step` and writes them anew)."""
        later = [s for s in self.all_steps() if s > step]
        for later_step in later:
            self._quarantine(later_step, "rewound")
        return later


def _stored_entries(step_dir: Path, abstract_state: Any, defaults: Mapping[str, Any]) -> Any:
    """The restore target without the `defaults` entries this checkpoint does not hold."""
    if not defaults:
        return abstract_state
    with _quiet_orbax():
        stored = ocp.PyTreeCheckpointer().metadata(step_dir / STATE_ITEM)
    tree = getattr(getattr(stored, "item_metadata", stored), "tree", stored)
    held = set(tree) if isinstance(tree, Mapping) else set(abstract_state)
    return {key: value for key, value in abstract_state.items() if key in held or key not in defaults}


def checkpoint_root(path: str | Path) -> Path:
    """The Orbax root of a root or of one step's directory (where the steps and hf_assets live)."""
    path = Path(path).absolute()
    return path.parent if (path / STATE_ITEM).is_dir() or (path / PARAMS_ITEM).is_dir() else path


def carry_assets(source_checkpoint: str | Path, target_root: str | Path) -> bool:
    """Copy the source's hf_assets next to the target's steps (a run continuing an imported model
    exports with the original config, generation config and tokenizer); never overwrites."""
    source = checkpoint_root(source_checkpoint) / ASSETS_DIR
    target = Path(target_root) / ASSETS_DIR
    if not source.is_dir() or target.exists() or jax.process_index() != 0:
        return False
    shutil.copytree(source, target)
    return True


# -- parameters only (tools: conversion, upcycling) ------------------------------------------------

@contextlib.contextmanager
def _quiet_orbax():
    """Reading one item of a step directly makes Orbax warn that the step's metadata file is elsewhere."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def _resolve_step_dir(path: Path, step: int | None) -> Path:
    """A step directory from either an Orbax root (latest or given step) or a step directory itself.

    Always absolute: Orbax's metadata reader silently returns nothing for a relative path.
    """
    path = path.absolute()
    if (path / STATE_ITEM).is_dir() or (path / PARAMS_ITEM).is_dir():
        if step is not None and path.name != str(step):
            raise CheckpointError(f"{path} is the checkpoint of step {path.name}, but step {step} was "
                                  "asked for")
        return path
    steps = committed_steps(path)
    if not steps:
        raise CheckpointError(f"{path} holds no checkpoint (expected <step>/state or <step>/params inside)")
    if step is None:
        return path / str(steps[-1])
    if step not in steps:
        raise CheckpointError(f"{path} has no checkpoint for step {step}; it has steps {steps}")
    return path / str(step)


def _params_location(step_dir: Path) -> tuple[Path, bool]:
    """(pytree directory, whether params are nested under 'params' of a full train state)."""
    if (step_dir / PARAMS_ITEM).is_dir():
        return step_dir / PARAMS_ITEM, False
    if (step_dir / STATE_ITEM).is_dir():
        return step_dir / STATE_ITEM, True
    raise CheckpointError(f"{step_dir} has neither a '{PARAMS_ITEM}' nor a '{STATE_ITEM}' item")


def load_config(path: str | Path, step: int | None = None) -> ml_collections.ConfigDict:
    step_dir = _resolve_step_dir(Path(path), step)
    config_file = step_dir / CONFIG_ITEM / "metadata"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: the checkpoint was saved without its config")
    return _with_current_defaults(json.loads(config_file.read_text()), str(config_file))


def _with_current_defaults(saved: dict, where: str) -> ml_collections.ConfigDict:
    """The saved config laid over today's defaults, so keys added since the save get their default values."""
    config = default_config()

    def overlay(target: ml_collections.ConfigDict, values: Mapping, prefix: str) -> None:
        for key, value in values.items():
            if key not in target:
                log.warning("%s: config key %s%s is no longer known; ignored", where, prefix, key)
            elif isinstance(target[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
                overlay(target[key], value, f"{prefix}{key}.")
            else:
                as_tuple = isinstance(target[key], tuple) and isinstance(value, list)  # JSON has no tuples
                target[key] = tuple(value) if as_tuple else value

    overlay(config, saved, "")
    return config


def params_metadata(path: str | Path, step: int | None = None) -> dict:
    """Nested dict of the stored parameters' metadata (each leaf has `.shape` and `.dtype`)."""
    location, nested = _params_location(_resolve_step_dir(Path(path), step))
    with _quiet_orbax():
        try:
            tree = ocp.PyTreeCheckpointer().metadata(location)
        except Exception as error:  # noqa: BLE001 - Orbax raises many kinds for a damaged item
            raise CheckpointError(f"{location}: the checkpoint's metadata cannot be read "
                                  f"({type(error).__name__}: {str(error)[:200]})") from None
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or (nested and PARAMS_ITEM not in tree):
        raise CheckpointError(f"{location} has no readable parameter metadata (is its _METADATA file "
                              "missing?); expected a complete checkpoint")
    return dict(tree[PARAMS_ITEM]) if nested else dict(tree)


def load_params(path: str | Path, step: int | None = None, shardings: Any = None,
                only: Any = None) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, config) from a training or parameters-only checkpoint.

    path: an Orbax root (the newest step, or `step`) or one step's directory. shardings: a pytree of
    jax.sharding.Sharding matching the params; arrays are read straight into them. Without it the values
    come back as host numpy arrays. only: a nested dict selecting a subset of the params (its leaves are
    ignored); only those are read, which lets a tool stream a large checkpoint leaf by leaf.
    """
    step_dir = _resolve_step_dir(Path(path), step)
    location, nested = _params_location(step_dir)
    metadata = params_metadata(step_dir)
    wanted = metadata if only is None else _select(metadata, only, str(location))

    def restore_arg(meta, sharding=None):
        if sharding is None:
            return ocp.ArrayRestoreArgs(restore_type=np.ndarray, dtype=meta.dtype)
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(meta.shape), dtype=meta.dtype)

    if shardings is None:
        restore_args = jax.tree.map(restore_arg, wanted)
    else:
        shardings = shardings if only is None else _select(shardings, only, "shardings")
        restore_args = jax.tree.map(restore_arg, wanted, shardings)
    item = jax.tree.map(lambda meta: np.zeros((), meta.dtype), wanted)  # structure only
    if nested:
        item, restore_args = {PARAMS_ITEM: item}, {PARAMS_ITEM: restore_args}
    with _quiet_orbax():
        restored = ocp.PyTreeCheckpointer().restore(
            location, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        )
    params = restored[PARAMS_ITEM] if nested else restored
    return params, load_config(step_dir)


def _select(tree: Mapping, only: Mapping, where: str) -> dict:
    selected = {}
    for key, sub in only.items():
        if key not in tree:
            raise CheckpointError(f"{where}: no parameter {key!r}; it has {sorted(tree)}")
        selected[key] = _select(tree[key], sub, f"{where}/{key}") if isinstance(sub, Mapping) else tree[key]
    return selected


def save_params(path: str | Path, params: Any, config: Any, step: int = 0) -> Path:
    """Write a parameters-only checkpoint `path/<step>/{params,config}`; refuses to overwrite one."""
    path = Path(path).absolute()
    if committed_steps(path):
        raise CheckpointError(f"{path} already holds checkpoints {committed_steps(path)}; "
                              "expected an empty or new directory (nothing is overwritten)")
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager(path, options=options, item_names=(PARAMS_ITEM, CONFIG_ITEM)) as manager:
        manager.save(step, args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            CONFIG_ITEM: ocp.args.JsonSave(_config_as_dict(config)),
        }), force=True)
        manager.wait_until_finished()
    return path / str(step)
