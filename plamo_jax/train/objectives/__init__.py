"""Training objectives by the name train.objective gives (`lm`, `dpo`, `distill`); base.py: the spec."""

from __future__ import annotations

from plamo_jax.errors import ConfigError
from plamo_jax.train.objectives.base import Objective
from plamo_jax.train.objectives.distill import DISTILL
from plamo_jax.train.objectives.dpo import DPO
from plamo_jax.train.objectives.lm import LANGUAGE_MODELING

OBJECTIVES: dict[str, Objective] = {objective.name: objective
                                   for objective in (LANGUAGE_MODELING, DPO, DISTILL)}


def register_objective(objective: Objective) -> Objective:
    """Add an objective; its name becomes a valid train.objective. A name is registered once."""
    if objective.name in OBJECTIVES and OBJECTIVES[objective.name] is not objective:
        raise ConfigError(f"objective {objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"config key train.objective={name!r}: expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
