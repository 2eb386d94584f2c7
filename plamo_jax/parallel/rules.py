"""Logical axis names -> mesh axes.

Every parameter and activation dimension carries a logical name; this module is the only place
that turns those names into mesh axes. Modules call `constrain(x, names)`; the trainer activates
a mesh and a rules table with `sharding_context`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from plamo_jax.errors import ShardingError

MESH_AXES = ("stage", "data", "fsdp", "expert", "sequence", "tensor")  # outermost: slowest links

# Parameters use plain names; activations use `act_*` names so that, e.g., the model dimension of
# a weight can be FSDP-sharded while the model dimension of an activation stays whole.
DEFAULT_RULES: dict[str, tuple[str, ...] | None] = {
    # parameters
    # the stages split the embedding and the LM head too, so none holds or computes all of them
    "vocab": ("tensor", "stage"),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "layers": ("stage",),  # pipeline stages hold consecutive scanned blocks
    "norm": None,
    "expert": ("expert",),
    "ssm_heads": ("tensor",),
    "ssm_inner": ("tensor",),
    "ssm_state": None,
    "conv": None,
    # activations
    "act_batch": ("data", "fsdp", "expert"),
    "act_length": ("sequence",),
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_head_dim": None,
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor", "stage"),
    "act_stage": ("stage",),  # the stage dimension of the pipeline's buffers
    "act_expert": ("expert",),
    "act_ssm_heads": ("tensor",),
}

Rules = Mapping[str, tuple[str, ...] | None]
LogicalAxes = Sequence[str | None]


def merge_rules(overrides: Mapping[str, Any] | None) -> dict[str, tuple[str, ...] | None]:
    """Default rules with config overrides applied (a str, a list of str, or None per name)."""
    rules = dict(DEFAULT_RULES)
    for name, value in (overrides or {}).items():
        if value is None or value == "" or value == ():
            rules[name] = None
        elif isinstance(value, str):
            rules[name] = (value,)
        else:
            rules[name] = tuple(value)
        for axis in rules[name] or ():
            if axis not in MESH_AXES:
                raise ShardingError(
                    f"config key mesh.rules.{name}: mesh axis {axis!r} is unknown; "
                    f"expected some of {MESH_AXES}"
                )
    return rules


def logical_to_spec(
    logical_axes: LogicalAxes | None,
    rules: Rules,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    what: str = "tensor",
    drop_indivisible: bool = False,
) -> PartitionSpec:
    """PartitionSpec for a tensor with the given logical axes.

    Mesh axes of size 1 are dropped (they shard nothing), a mesh axis already used by an earlier
    dimension is not reused, and, when `shape` is given, every sharded dimension must divide evenly:
    a ShardingError, or with `drop_indivisible` the rule's mesh axes are dropped from the last until
    the rest divide (a batch of 4 on an 8-way fsdp axis stays whole).
    """
    if logical_axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"{what}: logical axis {name!r} has no rule; known: {sorted(rules)}")
        axes = tuple(a for a in (rules[name] or ()) if mesh.shape.get(a, 1) > 1 and a not in used)
        if shape is not None and drop_indivisible:
            while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = axes[:-1]
        if shape is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[dim] % size:
                raise ShardingError(
                    f"{what}: dimension {dim} ({name!r}) has size {shape[dim]}, which is not "
                    f"divisible by mesh axes {axes} of total size {size}"
                )
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def tree_shardings(abstract_tree: Any, logical_tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays given a matching pytree of logical axis tuples."""

    def one(path, leaf, axes):
        spec = logical_to_spec(axes, rules, mesh, getattr(leaf, "shape", None), jax.tree_util.keystr(path))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_tree, logical_tree, is_leaf=lambda x: x is None)


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "plamo_jax_sharding", default=None
)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activate a mesh and rules for `constrain` while tracing."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    current = _ACTIVE.get()
    return None if current is None else current[0]


def active_mesh_and_rules() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `sharding_context`, for code that lays out shard_map specs."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `sharding_context`.

    Mesh axes that do not divide a dimension are left out for it (`drop_indivisible`): any batch the
    mesh can hold works, e.g. an evaluation batch smaller than the data x fsdp axes.
    """
    current = _ACTIVE.get()
    if current is None:
        return x
    mesh, rules = current
    spec = logical_to_spec(logical_axes, rules, mesh, x.shape, drop_indivisible=True)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
