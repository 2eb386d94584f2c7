"""Starting from an existing checkpoint: the architecture it was saved with must be the one configured.

Used for `checkpoint.init_params` (continual pre-training, SFT and DPO from a converted, upcycled or
pruned checkpoint) and for resuming from train.output_dir. The family's spec decides which keys must
match (models/registry.py); keys a continued run may change on purpose are logged. `check_sources`
runs before anything is read or written, so a wrong checkpoint costs no data loading and leaves no
directory behind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ml_collections

from plamo_jax.errors import CheckpointError, ConfigError
from plamo_jax.models import registry
from plamo_jax.train.checkpoint import committed_steps, load_config, load_params
from plamo_jax.train.state import ModelSetup

log = logging.getLogger(__name__)


def check_architecture(config: ml_collections.ConfigDict, checkpoint: str | Path, key: str,
                       step: int | None = None, unreadable_ok: bool = False) -> None:
    """ConfigError naming `key` (the config key that points at the checkpoint) if the model differs.

    unreadable_ok: a checkpoint whose config cannot be read is let through (resuming falls back to an
    older step, whose parameter shapes are checked as it is restored).
    """
    try:
        saved = load_config(checkpoint, step).model
    except CheckpointError as error:
        if unreadable_ok:
            return
        raise ConfigError(f"config key {key}={str(checkpoint)!r}: {error}") from None
    differences = registry.architecture_differences(saved, config.model)
    if differences:
        raise ConfigError(
            f"config key {key}={str(checkpoint)!r}: the checkpoint's model differs in "
            f"{', '.join(differences)}; "
            "expected the recipe to describe the same architecture (override the keys to match it)"
        )
    for changed in registry.changed_keys(saved, config.model):
        log.warning("model.%s=%r differs from the checkpoint's %r (%s); continuing with %r", changed,
                    config.model[changed], saved[changed], checkpoint, config.model[changed])


def checkpoint_directory(config: ml_collections.ConfigDict) -> Path:
    """Where a run's training checkpoints live (absolute: Orbax needs it)."""
    return (Path(config.train.output_dir) / "checkpoints").absolute()


def resume_steps(config: ml_collections.ConfigDict) -> list[int]:
    """Steps a run would resume from (none when checkpointing is off)."""
    return committed_steps(checkpoint_directory(config)) if config.checkpoint.enabled else []


def check_sources(config: ml_collections.ConfigDict, objective) -> None:
    """The checkpoints a run will start from fit its model: the newest one in train.output_dir, else
    checkpoint.init_params, and whatever the objective reads (DPO's reference); and train.output_dir
    can be written."""
    check_output_dir(config.train.output_dir)
    objective.check_frozen(config)
    steps = resume_steps(config)
    if steps and steps[-1] > config.train.steps:
        raise ConfigError(f"config key train.steps={config.train.steps}: train.output_dir="
                          f"{config.train.output_dir!r} already holds a checkpoint of step {steps[-1]}; "
                          "expected at least that many steps (or another train.output_dir)")
    if steps:
        check_architecture(config, checkpoint_directory(config), "train.output_dir", step=steps[-1],
                           unreadable_ok=True)
    elif config.checkpoint.init_params:
        check_architecture(config, config.checkpoint.init_params, "checkpoint.init_params")


def check_output_dir(output_dir: str) -> None:
    """ConfigError unless `output_dir` is (or can be made) a writable directory; creates nothing."""
    path = Path(output_dir).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    problem = None
    if existing is None or not existing.is_dir():
        problem = f"{existing} is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise ConfigError(f"config key train.output_dir={output_dir!r}: {problem}; expected a directory "
                          "this process can write")


def load_init_params(config: ml_collections.ConfigDict, setup: ModelSetup) -> Any:
    """checkpoint.init_params's parameters, read straight into setup's shardings (`check_sources` has
    checked the architecture)."""
    params, _ = load_params(config.checkpoint.init_params, shardings=setup.param_shardings)
    return params
