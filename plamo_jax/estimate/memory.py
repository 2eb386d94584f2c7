"""Per-device memory of one training step, in the terms of this stack, and a check against XLA.

`estimate_memory(config, num_devices)` adds up, per device:
- parameters, gradients and AdamW states: each parameter's shard size from its logical axes, the
  config's rules and the mesh (the same `logical_to_spec` the trainer uses), fp32;
- activations kept for the backward pass: JAX's own residuals of one scanned block under the remat
  policy, traced abstractly on per-device shapes (batch / heads / mlp / SSM heads divided by their
  mesh shards), times the number of blocks, plus the scan carry of every block;
- the peak working set of one block's backward (its recomputed residuals + cotangents), FSDP's
  gathered weights of one block, the embedding / LM head in compute layout, logits and the loss,
  the MoE all-to-all buffers of expert parallelism, gradient accumulation and the input batch.
The Megatron-style formula of Fujii et al. (shared/specs/memory_estimator.md) is a second opinion
for dense models; a configuration fits when the estimate is at most 80% of device memory.

`xla_memory` compiles the real step abstractly and reads XLA's per-device analysis. On CPU the
estimate's state bytes equal XLA's argument bytes, and its total is 0.9-1.7x XLA's arguments +
temporaries: with remat it errs high, keeping a block's whole recomputed residual set live while
XLA fuses part of it away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import AbstractMesh

from plamo_jax.configuration import ConfigError, mesh_rules, validate_config
from plamo_jax.models import moe as moe_lib
from plamo_jax.models import registry
from plamo_jax.models.decoder import REMAT_POLICIES
from plamo_jax.parallel.mesh import make_mesh, resolve_axis_sizes
from plamo_jax.parallel.rules import MESH_AXES, Rules, logical_to_spec, sharding_context
from plamo_jax.train import state as state_lib
from plamo_jax.train.optimizer import make_optimizer
from plamo_jax.train.step import BATCH_KEYS

GIB = 2**30
SAFETY_FRACTION = 0.8  # Fujii et al.: no run whose estimate was <= 80% of device memory ran out of memory
# HBM per device as vendors quote it, taken as GiB (nvidia-smi shows H100 80 GB as 79.6 GiB: the
# 20% margin of the rule covers such differences). "tpu-v5e" and "v5e" both name a TPU.
DEVICE_MEMORY_GIB: dict[str, float] = {
    "h100": 80.0,
    "h200": 141.0,
    "a100-40gb": 40.0,
    "a100-80gb": 80.0,
    "a100": 80.0,
    "v4": 32.0,
    "v5e": 16.0,
    "v5p": 95.0,
    "v6e": 32.0,
}
FP32_BYTES = 4
INPUT_BYTES = 4  # every batch array (ids, segment ids, positions, loss mask) is int32 or float32
TRAIN_STATE_SCALAR_BYTES = 4 + 8  # the state's int32 step and uint32[2] RNG key, replicated
COMMUNICATOR_BYTES = 0.5e9  # Fujii et al.: about 0.5 GB of NCCL buffers per communicator


@dataclasses.dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: float
    note: str
    counted: bool = True  # False: a share of another item, shown for the breakdown only


@dataclasses.dataclass(frozen=True)
class MegatronEstimate:
    """The paper's formula with our sizes: t = tensor, c = sequence, d = fsdp (fully sharded states)."""

    parameters_per_device: float  # Psi
    model_states: float
    activations: float
    logits_and_loss: float
    communicators: float

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.logits_and_loss + self.communicators


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    config_name: str
    num_devices: int
    mesh_sizes: dict[str, int]
    remat: str
    items: tuple[MemoryItem, ...]
    device: str
    device_memory: float
    megatron: MegatronEstimate | None

    @property
    def total(self) -> float:
        return sum(item.bytes for item in self.items if item.counted)

    @property
    def budget(self) -> float:
        return SAFETY_FRACTION * self.device_memory

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def bytes_of(self, name: str) -> float:
        for item in self.items:
            if item.name == name:
                return item.bytes
        raise KeyError(f"no memory item {name!r}; items are {[item.name for item in self.items]}")

    def table(self) -> str:
        """The breakdown, the total and the 80% verdict as printable lines."""
        used = [f"{axis}={size}" for axis, size in self.mesh_sizes.items() if size > 1]
        mesh = " x ".join(used) or "1 device"
        lines = [f"{self.config_name}: {self.num_devices} device(s), mesh {mesh}, remat {self.remat}",
                 f"{'item (per device)':44s} {'bytes':>12s}  note"]
        for item in self.items:
            name = item.name if item.counted else f"  (of which) {item.name}"
            lines.append(f"{name:44s} {format_bytes(item.bytes):>12s}  {item.note}")
        lines.append(f"{'total':44s} {format_bytes(self.total):>12s}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{self.device}: {self.device_memory / GIB:.0f} GiB; 80% = {self.budget / GIB:.1f} GiB"
                     f" -> {verdict} ({self.total / self.device_memory:.0%} of device memory)")
        if self.megatron is not None:
            m = self.megatron
            lines.append(f"Megatron-style formula (second opinion): {format_bytes(m.total)} = model states "
                         f"{format_bytes(m.model_states)} + activations {format_bytes(m.activations)} + "
                         f"logits/loss {format_bytes(m.logits_and_loss)} + communicators "
                         f"{format_bytes(m.communicators)}")
        return "\n".join(lines)


def format_bytes(value: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def format_count(count: int) -> str:
    return f"{count / 1e9:.3f}B parameters" if count >= 1e9 else f"{count / 1e6:.2f}M parameters"


def device_memory_bytes(device: str | None, memory_gib: float | None = None) -> tuple[str, float]:
    """(device label, bytes) from the table, or from an explicit size in GiB."""
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ConfigError(f"--device-memory-gib={memory_gib}: expected a positive size in GiB")
        return device or "custom", memory_gib * GIB
    name = (device or "h100").lower().removeprefix("tpu-").removeprefix("tpu")
    if name not in DEVICE_MEMORY_GIB:
        raise ConfigError(f"--device={device!r}: expected one of {sorted(DEVICE_MEMORY_GIB)} "
                          "or --device-memory-gib")
    return name, DEVICE_MEMORY_GIB[name] * GIB


# ------------------------------------------------------------------------------------------ layout


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: AbstractMesh
    rules: Rules

    def divisor(self, logical_name: str | None) -> int:
        """How many shards a dimension with this logical name is split into."""
        spec = logical_to_spec((logical_name,), self.rules, self.mesh)
        return _axes_size(spec[0], self.mesh, ())

    def local(self, size: int, logical_name: str | None) -> int:
        return -(-size // self.divisor(logical_name))

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return tuple(self.rules.get("act_batch") or ())


def _axes_size(entry, mesh: AbstractMesh, dropped: Sequence[str]) -> int:
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[a] for a in axes if a not in dropped)


def make_layout(config: ml_collections.ConfigDict, num_devices: int) -> Layout:
    ici, dcn = resolve_axis_sizes(config.mesh, num_devices)
    sizes = tuple(ici[a] * dcn[a] for a in MESH_AXES)
    return Layout(AbstractMesh(sizes, MESH_AXES), mesh_rules(config))


def shard_elements(shape: Sequence[int], logical_axes, layout: Layout, dropped: Sequence[str] = ()) -> int:
    """Elements of one device's shard; mesh axes in `dropped` are treated as gathered."""
    spec = tuple(logical_to_spec(logical_axes, layout.rules, layout.mesh, shape))
    spec += (None,) * (len(shape) - len(spec))
    return math.prod(-(-dim // _axes_size(entry, layout.mesh, dropped))
                     for dim, entry in zip(shape, spec, strict=True))


@dataclasses.dataclass(frozen=True)
class ParameterBytes:
    stored_bytes: float  # fp32 shards on one device (what parameters, grads and each Adam moment take)
    optimizer_bytes: float  # every optimizer state leaf on one device, plus the step and RNG key
    block_stored_elements: float  # one scanned block's weights as stored on a device
    block_compute_elements: float  # one scanned block's weights as computed (batch axes gathered)
    embeddings_compute_elements: float  # the embedding and LM head as computed
    count: int


@dataclasses.dataclass(frozen=True)
class _ParameterShard:
    """One parameter's per-device elements as stored and as computed (a pytree leaf)."""

    stored: int
    compute: int
    module: str  # top-level key: "blocks", "embed", "lm_head", "final_norm"


def parameter_bytes(config: ml_collections.ConfigDict, layout: Layout, num_blocks: int) -> ParameterBytes:
    _, abstract_params, logical = state_lib.abstract_model(config.model)
    expert_axes = tuple(layout.rules.get("expert") or ())

    def shard(path, leaf, axes) -> _ParameterShard:
        # Weights are all-gathered over the axes that split the batch (FSDP), except that expert
        # weights stay split over the expert axes (each shard runs its own experts).
        keep = expert_axes if "expert" in axes else ()
        gathered = tuple(a for a in layout.batch_axes if a not in keep)
        return _ParameterShard(shard_elements(leaf.shape, axes, layout),
                               shard_elements(leaf.shape, axes, layout, gathered),
                               str(getattr(path[0], "key", path[0])))

    shards = jax.tree_util.tree_map_with_path(shard, abstract_params, logical)
    leaves = jax.tree.leaves(shards)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    opt_bytes = optax.tree_map_params(
        optimizer, lambda leaf, p: p.stored * leaf.dtype.itemsize,
        jax.eval_shape(optimizer.init, abstract_params), shards,
        transform_non_params=lambda leaf: leaf.size * leaf.dtype.itemsize)
    return ParameterBytes(
        stored_bytes=FP32_BYTES * sum(p.stored for p in leaves),
        optimizer_bytes=float(sum(jax.tree.leaves(opt_bytes))) + TRAIN_STATE_SCALAR_BYTES,
        block_stored_elements=sum(p.stored for p in leaves if p.module == "blocks") / num_blocks,
        block_compute_elements=sum(p.compute for p in leaves if p.module == "blocks") / num_blocks,
        embeddings_compute_elements=sum(p.compute for p in leaves if p.module in ("embed", "lm_head")),
        count=state_lib.parameter_count(abstract_params),
    )


# ------------------------------------------------------------------------------------- activations


def residual_avals(fn, *args) -> list[jax.ShapeDtypeStruct]:
    """Arrays that JAX keeps between the forward and backward pass of `fn` (its inputs excluded)."""
    leaves, tree = jax.tree.flatten(args)

    def forward_and_residuals(*flat):
        _, vjp_fn = jax.vjp(lambda *xs: fn(*jax.tree.unflatten(tree, xs)), *flat)
        return jax.tree.leaves(vjp_fn)

    jaxpr = jax.make_jaxpr(forward_and_residuals)(*leaves).jaxpr
    inputs, seen, found = set(jaxpr.invars), set(), []
    for var in jaxpr.outvars:
        if isinstance(var, jax.extend.core.Literal) or var in inputs or var in seen:
            continue
        seen.add(var)
        found.append(jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype))
    return found


def nbytes(avals: Sequence[jax.ShapeDtypeStruct]) -> float:
    return float(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in avals))


@contextlib.contextmanager
def accelerator_expert_kernels() -> Iterator[None]:
    """Trace MoE experts with the ragged grouped matmuls that GPUs/TPUs run, not the CPU fallback."""
    original = moe_lib.grouped_swiglu
    moe_lib.grouped_swiglu = moe_lib.ragged_swiglu
    try:
        yield
    finally:
        moe_lib.grouped_swiglu = original


def local_model_config(model_cfg: ml_collections.ConfigDict, layout: Layout) -> ml_collections.ConfigDict:
    """The model as one device computes it: head, MLP and SSM-head counts divided by their shards."""
    local = ml_collections.ConfigDict(model_cfg.to_dict())
    local.num_heads = layout.local(model_cfg.num_heads, "act_heads")
    local.num_kv_heads = layout.local(model_cfg.num_kv_heads, "act_kv_heads")
    local.mlp_dim = layout.local(model_cfg.mlp_dim, "act_mlp")
    local.expert_mlp_dim = layout.local(model_cfg.expert_mlp_dim, "act_mlp")
    local.ssm_num_heads = layout.local(model_cfg.ssm_num_heads, "act_ssm_heads")
    return local


@dataclasses.dataclass(frozen=True)
class BlockActivations:
    residuals: dict[str, float]  # bytes of one block's residuals per remat policy
    cotangents: float  # the two largest residuals again: gradients live next to their primals
    family_part: float  # residuals of the SSM mixers / MoE MLP within one block (remat none)


def block_activations(local_cfg: ml_collections.ConfigDict, batch: int, length: int, length_shards: int = 1,
                      host_kernels: bool = False) -> BlockActivations:
    """Residuals of one scanned block on one device's shapes, for each remat policy.

    With sequence parallelism each device keeps 1 / `length_shards` of every residual, attention
    scores included (XLA splits them by query rows), except the keys and values that attention
    gathers over the whole sequence: the block is traced at full `length`, scaled, and those added.
    host_kernels: trace the MoE expert kernels this process would compile (the CPU fallback on a CPU
    host), for comparing with a compile here; by default those that GPUs and TPUs run.
    """
    family = registry.get_family(local_cfg.family)
    block = nnx.eval_shape(lambda: family.block_class()(local_cfg, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((batch, length, local_cfg.d_model), jnp.dtype(local_cfg.dtype))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    whole = [(block, lambda b, h, seg: b(h, seg, seg, jnp.int32(0))[0])]
    residuals, largest = {}, 0.0
    kernels = contextlib.nullcontext() if host_kernels else accelerator_expert_kernels()
    with kernels:
        for name, policy in REMAT_POLICIES.items():
            avals = module_residuals(whole, x, ids, policy)
            residuals[name] = nbytes(avals) / length_shards
            if name == "none":
                largest = sum(sorted((nbytes([a]) for a in avals), reverse=True)[:2]) / length_shards
        family_part = nbytes(module_residuals(_family_parts(block, local_cfg), x, ids, None))
    # Keys and values after the gather (rotated keys and values feed the score and output einsums).
    kv_bytes = 2 * batch * length * local_cfg.num_kv_heads * local_cfg.head_dim * x.dtype.itemsize
    residuals["none"] += _attention_layers(block, local_cfg) * kv_bytes * (1 - 1 / length_shards)
    return BlockActivations(residuals, largest, family_part / length_shards)


def module_residuals(parts, x, ids, policy) -> list[jax.ShapeDtypeStruct]:
    """Residuals of each (module, call(module, x, segment_ids)) in `parts` under a remat policy."""
    found = []
    for module, call in parts:
        graphdef, params = nnx.split(module)

        def apply(params, h, segment_ids, graphdef=graphdef, call=call):
            return call(nnx.merge(graphdef, params), h, segment_ids)

        fn = apply if policy is None else jax.checkpoint(apply, policy=policy)
        found += residual_avals(fn, params, x, ids)
    return found


def _attention_layers(block, local_cfg) -> int:
    if local_cfg.family == "hybrid":
        return sum(not layer.is_mamba for layer in block.layers)
    return 1


def _family_parts(block, local_cfg):
    """The Mamba mixers (hybrid) or the MoE MLP (moe) of one block; none for dense."""
    if local_cfg.family == "hybrid":
        return [(layer.mixer, lambda m, h, seg: m(h, seg)) for layer in block.layers if layer.is_mamba]
    if local_cfg.family == "moe":
        return [(block.mlp, lambda m, h, seg: m(h)[0])]
    return []


def moe_dispatch_bytes(model_cfg, layout: Layout, tokens_per_device: int) -> float:
    """All-to-all buffers of one MoE block beyond the single-shard computation that the trace covers.

    Each device sends a [shards, slots, d_model] buffer, receives one, runs the experts on every
    received row and sends the results back (see models/moe.py `expert_parallel_moe`).
    """
    shards = layout.divisor("expert")
    if model_cfg.family != "moe" or shards == 1:
        return 0.0
    dtype_bytes = jnp.dtype(model_cfg.dtype).itemsize
    assignments = tokens_per_device * model_cfg.num_experts_per_token
    slots = assignments
    if model_cfg.capacity_factor > 0:
        global_tokens = tokens_per_device * layout.divisor("act_batch") * layout.divisor("act_length")
        capacity = moe_lib.expert_capacity(global_tokens, model_cfg.num_experts_per_token,
                                           model_cfg.num_experts, model_cfg.capacity_factor)
        slots = min(slots, capacity * (model_cfg.num_experts // shards))
    buffers = 3 * shards * slots * model_cfg.d_model  # send, receive, send back
    extra_rows = shards * slots - assignments  # rows the experts process beyond this device's own
    expert_width = layout.local(model_cfg.expert_mlp_dim, "act_mlp")
    return float(dtype_bytes * (buffers + extra_rows * (2 * model_cfg.d_model + 3 * expert_width)))


# ---------------------------------------------------------------------------------------- estimate


def megatron_estimate(config: ml_collections.ConfigDict, layout: Layout) -> MegatronEstimate | None:
    """Fujii et al.'s formula (bf16 activations, flash attention, sequence parallel) for dense models."""
    m = config.model
    if m.family != "dense":
        return None
    shape = layout.mesh.shape
    h, ffn, layers, vocab = m.d_model, m.mlp_dim, m.num_layers, m.vocab_size
    a, k = m.num_heads, m.num_kv_heads
    t, c, d = shape["tensor"], shape["sequence"], shape["fsdp"]
    seq = config.train.seq_len
    b = config.train.global_batch_size // config.train.microbatches // layout.divisor("act_batch")
    psi = layers * ((2 * h * h + 2 * h * h * k / a + 3 * h * ffn) / t + 2 * h)
    psi += vocab * h / t * (1 if m.tie_embeddings else 2) + h
    activations = seq * b * h * (12 + 4 * k / a + 8 * ffn / h) / (t * c) * layers
    logits = (4 + 2) * seq * b * vocab / t
    communicators = COMMUNICATOR_BYTES * sum(1 for size in shape.values() if size > 1)
    return MegatronEstimate(psi, 16 * psi / d, activations, logits, communicators)


def estimate_memory(config: ml_collections.ConfigDict, num_devices: int, *, device: str | None = "h100",
                    device_memory_gib: float | None = None, host_kernels: bool = False) -> MemoryEstimate:
    """Per-device bytes of one training step of `config` on `num_devices` devices.

    device / device_memory_gib: the accelerator whose memory the 80% rule uses (table or explicit size).
    host_kernels: see `block_activations` (True only to compare with a compile on this host).
    """
    validate_config(config, num_devices)
    device_name, device_memory = device_memory_bytes(device, device_memory_gib)
    m, train = config.model, config.train
    layout = make_layout(config, num_devices)
    num_blocks = registry.get_family(m.family).num_blocks(m)
    params = parameter_bytes(config, layout, num_blocks)
    fp32_shards = params.stored_bytes
    items = [
        MemoryItem("parameters", fp32_shards, f"fp32, {format_count(params.count)}, sharded by rules"),
        MemoryItem("gradients", fp32_shards, "fp32, laid out like the parameters"),
        MemoryItem("optimizer states", params.optimizer_bytes, "AdamW mu + nu (fp32), step counts, RNG key"),
        MemoryItem("optimizer update", fp32_shards, "fp32 clipped gradients / updates before applying"),
    ]
    if train.microbatches > 1:
        items.append(MemoryItem("gradient accumulation", fp32_shards,
                                f"fp32 running sum over {train.microbatches} microbatches"))
    if train.objective == "dpo":
        items.append(MemoryItem("DPO reference parameters", fp32_shards,
                                "frozen fp32 copy of the starting checkpoint, sharded like the parameters"))
    items += activation_items(config, layout, params, num_blocks, host_kernels)
    mesh_sizes = {axis: int(layout.mesh.shape[axis]) for axis in MESH_AXES}
    return MemoryEstimate(config.get("name", "config"), num_devices, mesh_sizes, m.remat, tuple(items),
                          device_name, device_memory, megatron_estimate(config, layout))


def activation_items(config, layout: Layout, params: ParameterBytes, num_blocks: int,
                     host_kernels: bool) -> list[MemoryItem]:
    """Everything that scales with the batch: inputs, residuals, working sets, logits.

    DPO runs each pair's chosen and rejected sequences as two rows of one forward pass (the
    reference's forward keeps no residuals, so the policy's working set bounds it).
    """
    m, train = config.model, config.train
    dtype_bytes = jnp.dtype(m.dtype).itemsize
    sequences = train.global_batch_size * (2 if train.objective == "dpo" else 1)
    rows = -(-sequences // layout.divisor("act_batch"))
    batch = -(-rows // train.microbatches)
    length = layout.local(train.seq_len, "act_length")
    tokens = batch * length
    blocks = block_activations(local_model_config(m, layout), batch, train.seq_len,
                               layout.divisor("act_length"), host_kernels)
    saved = blocks.residuals[m.remat]
    carry = dtype_bytes * tokens * m.d_model  # the scan keeps every block's input
    recompute = blocks.residuals["none"] - saved
    dispatch = moe_dispatch_bytes(m, layout, tokens)
    dispatch_saved = dispatch if m.remat == "none" else 0.0
    # FSDP all-gathers one block's weights (in compute dtype) and reduce-scatters its fp32 gradients;
    # without FSDP only a bf16 cast is made, and fp32 weights are used in place.
    gathers = params.block_compute_elements > params.block_stored_elements
    cast_bytes = dtype_bytes if gathers or dtype_bytes != FP32_BYTES else 0
    block_weights = params.block_compute_elements * (cast_bytes + (FP32_BYTES if gathers else 0))
    local_vocab = layout.local(m.vocab_size, "act_vocab")
    logits = tokens * local_vocab * (2 * FP32_BYTES + dtype_bytes * (dtype_bytes != FP32_BYTES))
    logits += tokens * m.d_model * dtype_bytes  # final norm output, kept for the head's weight gradient
    items = [
        MemoryItem("input batch", INPUT_BYTES * len(BATCH_KEYS) * rows * length,
                   "ids, targets, segment ids, positions, loss mask"),
        MemoryItem("activations saved for backward", num_blocks * (saved + carry + dispatch_saved),
                   f"{num_blocks} blocks x ({format_bytes(saved)} residuals under remat {m.remat!r} + "
                   f"{format_bytes(carry)} scan carry)"),
    ]
    if blocks.family_part:
        label, part = (("SSM state, conv and chunk buffers", "Mamba mixers") if m.family == "hybrid"
                       else ("MoE router and experts", "MoE MLP"))
        where = "saved in every block" if m.remat == "none" else "part of the working set"
        items.append(MemoryItem(label, blocks.family_part, f"one block's {part}, {where}", counted=False))
    if dispatch:
        items.append(MemoryItem("MoE all-to-all dispatch buffers", dispatch,
                                f"one block, {layout.divisor('expert')} expert shards; "
                                + ("saved in every block" if m.remat == "none" else "working set"),
                                counted=m.remat != "none"))
    items += [
        MemoryItem("block recompute + backward working set", recompute + blocks.cotangents,
                   f"one block: recomputed residuals {format_bytes(recompute)} + cotangents "
                   f"{format_bytes(blocks.cotangents)}"),
        MemoryItem("gathered block weights", block_weights,
                   "one block's weights in compute dtype" + (" + unreduced fp32 grads (FSDP)" * gathers)),
        MemoryItem("embedding / LM head gathered",
                   params.embeddings_compute_elements * (dtype_bytes + FP32_BYTES),
                   "compute-dtype copy + unreduced fp32 gradient"),
        MemoryItem("logits and cross entropy", logits, "fp32 logits + fp32 dlogits (+ cast) + final norm"),
    ]
    return items


# ------------------------------------------------------------------------------------- XLA's view


@dataclasses.dataclass(frozen=True)
class XlaMemory:
    argument: int
    output: int
    alias: int
    temp: int

    @property
    def peak(self) -> int:
        """Arguments + temporaries: outputs alias the donated state."""
        return self.argument + self.temp


def xla_memory(config: ml_collections.ConfigDict, devices: Sequence | None = None) -> XlaMemory:
    """Compile the real train step abstractly for `devices` and read XLA's per-device memory analysis."""
    devices = list(devices if devices is not None else jax.devices())
    validate_config(config, len(devices))
    mesh = make_mesh(config.mesh, devices)
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    batch_sharding = state_lib.batch_sharding(mesh, rules)
    dpo = config.train.objective == "dpo"
    if dpo:
        from plamo_jax.posttrain.dpo import jit_dpo_step
        from plamo_jax.posttrain.preference_data import BATCH_KEYS as keys

        step = jit_dpo_step(config, setup, optimizer)
    else:
        step, keys = state_lib.jit_train_step(config, setup, optimizer), BATCH_KEYS

    def abstract(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    shape = (config.train.global_batch_size, config.train.seq_len)
    batch = {key: abstract(shape, jnp.float32 if key.endswith("loss_mask") else jnp.int32, batch_sharding)
             for key in keys}
    arguments = [state_lib.abstract_state(setup, optimizer), batch]
    if dpo:  # the frozen reference parameters
        arguments.append(jax.tree.map(lambda leaf, sharding: abstract(leaf.shape, leaf.dtype, sharding),
                                      setup.abstract_params, setup.param_shardings))
    with sharding_context(mesh, rules):
        analysis = step.lower(*arguments).compile().memory_analysis()
    return XlaMemory(analysis.argument_size_in_bytes, analysis.output_size_in_bytes,
                     analysis.alias_size_in_bytes, analysis.temp_size_in_bytes)
