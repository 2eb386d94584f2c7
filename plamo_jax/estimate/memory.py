"""Per-device memory of one training step, in the terms of this stack, and a check against XLA.

`estimate_memory(config, num_devices)` is what lives through the step plus the larger of two working
sets that never overlap in time, per device:
- lasting: parameters, gradients and AdamW states (each parameter's shard from its logical axes, the
  config's rules and the mesh: the same `logical_to_spec` the trainer uses; fp32), the gradient
  accumulator, frozen models, the input batch, and the activations kept for the backward pass: JAX's
  own residuals of one scanned block under the remat policy, traced abstractly on per-device shapes
  (batch / heads / mlp / SSM heads divided by their mesh shards), times the number of blocks, plus
  the scan carry of every block;
- the block-backward phase: one block's backward pass (its recomputation included) walked over its
  jaxpr as XLA runs it (`estimate/liveness.py`: elementwise chains fused, buffers freed after their
  last reader, weight gradients handed on to their reduction), FSDP's gathered weights of one block,
  the MoE all-to-all buffers of expert parallelism and what context parallelism adds;
- the LM-head phase: the head's weights gathered, and the final norm, the head, the loss and their
  backward walked the same way (fp32 logits of the device's vocabulary shard, the head's fp32 weight
  gradient before its reduction); the input embedding is read in place, never gathered;
- under pipeline parallelism (mesh.stage > 1): one stage's parameters (the rules shard the blocks and
  the vocabulary over `stage`), the residuals of all R*M+S-1 iterations on one microbatch's rows, the
  stream of microbatches, the circular schedule's regathered blocks and the per-data-shard weight copies
  (`pipeline_activation_items`);
- under context parallelism (mesh.sequence > 1, `model.context_parallel`), what one attention layer's
  strategy holds on top: gathered keys and values at full length (all_gather) or one block in flight
  around the ring (ring), and the flash kernel's block x block temporaries.
The Megatron-style formula of Fujii et al. (shared/specs/memory_estimator.md) is a second opinion
for dense models; a configuration fits when the estimate is at most 80% of device memory.

The walk is told which compiler it models: the TPU compiler fuses elementwise producers into matmuls,
XLA's GPU and CPU backends call GEMM libraries on operands in memory. Against the TPU compiler's own
peak (`estimate/aot.py`, benchmarks/bench_aot.py) the five large recipes come out 0.93-1.10; against
XLA on this CPU host (`xla_memory`, which materialises more) 0.62-0.95. The state bytes equal XLA's
argument bytes exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from plamo_jax.data import batch as batch_layout
from plamo_jax.errors import ConfigError
from plamo_jax.estimate import liveness
from plamo_jax.models import attention as attention_lib
from plamo_jax.models import kernels
from plamo_jax.models.decoder import REMAT_POLICIES, Decoder
from plamo_jax.models.family import FamilySpec
from plamo_jax.parallel import context as context_lib
from plamo_jax.parallel.pipeline import STAGE_AXIS, PipelinePlan, PipelineSettings, data_copies
from plamo_jax.parallel.rules import MESH_AXES, Rules, logical_to_spec, sharding_context
from plamo_jax.train import state as state_lib
from plamo_jax.train.losses import chunked_cross_entropy_sums, cross_entropy_sums
from plamo_jax.train.run import Run, build_run

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
TRAIN_STATE_SCALAR_BYTES = 4 + 8  # the state's int32 step and uint32[2] RNG key, replicated
COMMUNICATOR_BYTES = 0.5e9  # Fujii et al.: about 0.5 GB of NCCL buffers per communicator


# Two stretches of the step that never overlap: the LM head and loss (forward and backward), then each
# block's backward in turn. Each holds its working set on top of what lives through the step.
HEAD_PHASE = "LM head and loss"
BLOCK_PHASE = "block backward"


@dataclasses.dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: float
    note: str
    counted: bool = True  # False: a share of another item, shown for the breakdown only
    phase: str | None = None  # None: lives through the step; else HEAD_PHASE or BLOCK_PHASE


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
    def phases(self) -> dict[str, float]:
        """Bytes of each phase's working set."""
        found: dict[str, float] = {}
        for item in self.items:
            if item.counted and item.phase is not None:
                found[item.phase] = found.get(item.phase, 0.0) + item.bytes
        return found

    @property
    def peak_phase(self) -> str | None:
        phases = self.phases
        return max(phases, key=phases.get) if phases else None

    @property
    def total(self) -> float:
        """What lives through the step + the larger phase's working set."""
        lasting = sum(item.bytes for item in self.items if item.counted and item.phase is None)
        return lasting + max(self.phases.values(), default=0.0)

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
        phases = self.phases
        for phase in (None, *phases):
            if phase is not None:
                peak = " (the peak)" if phase == self.peak_phase else " (not at the peak: not counted)"
                lines.append(f"[{phase}]{peak}: {format_bytes(phases[phase])}")
            for item in (item for item in self.items if item.phase == phase):
                name = item.name if item.counted else f"  (of which) {item.name}"
                lines.append(f"{name:44s} {format_bytes(item.bytes):>12s}  {item.note}")
        lines.append(f"{'total':44s} {format_bytes(self.total):>12s}  lasting items + the larger phase")
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


def device_platform(device_name: str) -> str:
    """"tpu" for the TPU entries of DEVICE_MEMORY_GIB, else "gpu": whose kernels the estimate traces."""
    return "tpu" if device_name.startswith("v") else "gpu"


# ------------------------------------------------------------------------------------------ layout


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: AbstractMesh | Mesh
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
    block_stored_elements: float  # one scanned block's weights as stored on a device (of its stage's blocks)
    block_compute_elements: float  # one scanned block's weights as computed (batch axes gathered)
    head_compute_elements: float  # the LM head (the embedding when tied) as computed
    count: int


@dataclasses.dataclass(frozen=True)
class _ParameterShard:
    """One parameter's per-device elements as stored and as computed (a pytree leaf)."""

    stored: int
    compute: int
    module: str  # top-level key: "blocks", "embed", "lm_head", "final_norm"


def parameter_bytes(run: Run, layout: Layout, num_blocks: int) -> ParameterBytes:
    abstract_params, logical = run.setup.abstract_params, run.setup.logical_axes
    expert_axes = tuple(layout.rules.get("expert") or ())
    local_blocks = num_blocks // layout.divisor("layers")  # pipeline stages hold their blocks only

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
    head_module = "lm_head" if any(p.module == "lm_head" for p in leaves) else "embed"
    optimizer = run.optimizer
    opt_bytes = optax.tree_map_params(
        optimizer, lambda leaf, p: p.stored * leaf.dtype.itemsize,
        jax.eval_shape(optimizer.init, abstract_params), shards,
        transform_non_params=lambda leaf: leaf.size * leaf.dtype.itemsize)
    return ParameterBytes(
        stored_bytes=FP32_BYTES * sum(p.stored for p in leaves),
        optimizer_bytes=float(sum(jax.tree.leaves(opt_bytes))) + TRAIN_STATE_SCALAR_BYTES
        + nbytes(jax.tree.leaves(state_lib.abstract_guard(run.guard))),  # its windows, replicated
        block_stored_elements=sum(p.stored for p in leaves if p.module == "blocks") / local_blocks,
        block_compute_elements=sum(p.compute for p in leaves if p.module == "blocks") / local_blocks,
        head_compute_elements=sum(p.compute for p in leaves if p.module == head_module),
        count=state_lib.parameter_count(abstract_params),
    )


def frozen_parameter_bytes(model_cfg: ml_collections.ConfigDict, layout: Layout) -> float:
    """fp32 bytes per device of a frozen model's parameters on the run's mesh and rules."""
    _, abstract_params, logical = state_lib.abstract_model(model_cfg)
    shards = jax.tree.map(lambda leaf, axes: shard_elements(leaf.shape, axes, layout), abstract_params,
                          logical)
    return FP32_BYTES * sum(jax.tree.leaves(shards))


def frozen_parameter_count(model_cfg: ml_collections.ConfigDict) -> int:
    return state_lib.parameter_count(state_lib.abstract_model(model_cfg)[1])


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


def local_model_config(model_cfg: ml_collections.ConfigDict, family: FamilySpec,
                       layout: Layout) -> ml_collections.ConfigDict:
    """The model as one device computes it: the widths tensor parallelism splits (the family's
    activation_shards: heads, MLP, SSM heads, ...) divided by their shards."""
    local = ml_collections.ConfigDict(model_cfg.to_dict())
    for key, logical_name in family.activation_shards.items():
        local[key] = layout.local(model_cfg[key], logical_name)
    return local


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """How attention meets the other sequence shards' keys and values (parallel/context.py)."""

    strategy: str  # "none" (also without sequence shards), "all_gather", "ring" or "ulysses"
    shards: int  # devices along the `sequence` axis
    block: int  # the flash kernel's block length inside context parallelism

    @property
    def active(self) -> bool:
        return self.strategy != "none" and self.shards > 1


def context_parallel(model_cfg: ml_collections.ConfigDict, layout: Layout, seq_len: int) -> ContextParallel:
    """The strategy attention runs on this mesh, and the kernel block `context_attention` picks: blocks
    never straddle two of a shard's chunks (two under the causal load-balanced layout)."""
    shards = int(layout.mesh.shape.get(context_lib.SEQUENCE_AXIS, 1))
    strategy = model_cfg.context_parallel if shards > 1 else "none"
    chunks = 2 if context_lib.load_balanced(model_cfg, shards) else 1
    chunk = max(seq_len // (shards * chunks), 1)
    return ContextParallel(strategy, shards, math.gcd(chunk, model_cfg.attention_block))


@dataclasses.dataclass(frozen=True)
class BlockActivations:
    residuals: dict[str, float]  # bytes of one block's residuals per remat policy
    backward: float  # one block's backward pass (recomputation included) beyond what its forward keeps
    family_part: float  # residuals of the family's own part (SSM mixers, MoE MLP) of a block (remat none)


def walked_bytes(fn, differentiable, fixed, *, operands_fused: bool, with_forward: bool) -> float:
    """Peak bytes of fn(differentiable, fixed)'s gradient computation by the liveness walk
    (estimate/liveness.py), gradients handed on as they are written, inputs excluded.

    with_forward: walk the forward and backward passes as one program; else only the backward pass,
    whose inputs (the forward's residuals and the incoming cotangent) are counted elsewhere. Under
    rematerialisation the backward pass recomputes the forward, and the walk includes that.
    operands_fused: see liveness.peak_bytes (True for the TPU compiler)."""
    output = jax.eval_shape(fn, differentiable, fixed)
    if with_forward:
        def program(differentiable, fixed, cotangent):
            return jax.vjp(lambda d: fn(d, fixed), differentiable)[1](cotangent)

        jaxpr = jax.make_jaxpr(program)(differentiable, fixed, output)
    else:
        pullback_tree = {}

        def forward(differentiable, fixed):
            pullback = jax.vjp(lambda d: fn(d, fixed), differentiable)[1]
            leaves, pullback_tree["tree"] = jax.tree.flatten(pullback)
            return leaves

        residuals = jax.eval_shape(forward, differentiable, fixed)
        jaxpr = jax.make_jaxpr(lambda leaves, cotangent: jax.tree.unflatten(pullback_tree["tree"], leaves)(
            cotangent))(residuals, output)
    return float(liveness.peak_bytes(jaxpr, keep_results=False, matmul_operands_fused=operands_fused))


def traced_model_config(local_cfg: ml_collections.ConfigDict, cp: ContextParallel,
                        length: int) -> ml_collections.ConfigDict:
    """The model as its block is traced, with the attention kernel chosen for the platform being traced
    for. Under context parallelism attention always runs the flash kernel with the strategy's block,
    whatever model.attention_impl says (the single-program path the trace takes has no mesh, so it is
    told which kernel to use). cuDNN's kernel cannot be traced without a GPU, nor splash's block masks
    without their TPU layout: flash stands in for both, with the same residuals (output and
    log-normaliser)."""
    traced = ml_collections.ConfigDict(local_cfg.to_dict())
    if cp.active:
        traced.attention_impl, traced.attention_block = "flash", cp.block
        return traced
    impl = attention_lib.resolve_attention_impl(local_cfg.attention_impl, jnp.dtype(local_cfg.dtype),
                                                local_cfg.head_dim, length, local_cfg.attention_block)
    traced.attention_impl = "flash" if impl in ("cudnn", "splash") else impl
    return traced


def block_activations(family: FamilySpec, local_cfg: ml_collections.ConfigDict, batch: int, length: int,
                      length_shards: int = 1, host_kernels: bool = False,
                      cp: ContextParallel | None = None, kernel_platform: str = "tpu") -> BlockActivations:
    """Residuals of one scanned block on one device's shapes, for each remat policy.

    With sequence parallelism each device keeps 1 / `length_shards` of every residual: the block is
    traced at full `length` (without a mesh, so on the single-program path) and scaled. Queries,
    outputs and the kernel's log-normaliser are then local under every strategy; the keys and values
    are not where attention gathers them: over the whole sequence ("none", scores split by query rows
    as XLA does) or along the sequence axis ("all_gather"), and those are added at full length. The
    ring gathers nothing: each shard keeps its own block (the one in flight is working set,
    `context_working_set`).
    host_kernels: trace the kernels this process would compile (the MoE experts' CPU fallback on a CPU
    host), for comparing with a compile here; by default those of `kernel_platform` ("gpu" or "tpu":
    ragged grouped matmuls, and on GPU cuDNN attention where model.attention_impl=auto picks it).
    """
    cp = cp or ContextParallel("none", length_shards, local_cfg.attention_block)
    x = jax.ShapeDtypeStruct((batch, length, local_cfg.d_model), jnp.dtype(local_cfg.dtype))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    residuals = {}
    # By default trace the kernels GPUs / TPUs run (e.g. grouped matmuls), not a CPU fallback.
    with contextlib.nullcontext() if host_kernels else kernels.kernels_for(kernel_platform):
        traced_cfg = traced_model_config(local_cfg, cp, length)
        block = nnx.eval_shape(lambda: family.block(traced_cfg, rngs=nnx.Rngs(0)))
        whole = [(block, lambda b, h, seg: b(h, seg, seg, jnp.int32(0))[0])]
        for name, policy in REMAT_POLICIES.items():
            residuals[name] = nbytes(module_residuals(whole, x, ids, policy)) / length_shards
        graphdef, params = nnx.split(block)

        def apply(differentiable, segment_ids):
            weights, h = differentiable
            return nnx.merge(graphdef, weights)(h, segment_ids, segment_ids, jnp.int32(0))[0]

        policy = REMAT_POLICIES[local_cfg.remat]
        fn = apply if policy is None else jax.checkpoint(apply, policy=policy)
        backward = walked_bytes(fn, (params, x), ids, with_forward=False,
                                operands_fused=kernel_platform == "tpu" and not host_kernels) / length_shards
        parts = family.memory_part.select(block) if family.memory_part is not None else []
        family_part = nbytes(module_residuals(parts, x, ids, None))
    if cp.strategy not in ("ring", "ulysses"):
        # Keys and values after the gather (rotated keys and values feed the score and output einsums);
        # ulysses's all-to-all leaves each device the whole length of 1/S of the heads: no more bytes.
        attention_layers = family.attention_layers_per_block(local_cfg)
        gathered = kv_bytes(local_cfg, batch, length) * (1 - 1 / length_shards)
        residuals["none"] += attention_layers * gathered
    return BlockActivations(residuals, backward, family_part / length_shards)


def head_and_loss_bytes(local_cfg: ml_collections.ConfigDict, local_vocab: int,
                        rows: int, length: int, loss_chunk: int, z_loss: float, *,
                        operands_fused: bool) -> float:
    """One device's final norm, LM head and loss, forward and backward, by the liveness walk: the fp32
    logits of its vocabulary shard (all positions, or `loss_chunk` at a time as train/losses.py runs
    them), the cross entropy and z-loss and their gradients, and the head's fp32 weight gradient
    before it is reduced. The decoder's own head and norm are traced (abstractly) on a model whose
    vocabulary is the device's shard; the gathered head weights are counted apart."""
    head_cfg = ml_collections.ConfigDict(local_cfg.to_dict())
    head_cfg.vocab_size = local_vocab
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(head_cfg, rngs=nnx.Rngs(0))))
    params = nnx.to_pure_dict(params)
    head_keys = ("final_norm", "embed" if local_cfg.tie_embeddings else "lm_head")
    head = {key: params[key] for key in head_keys}
    rest = {key: value for key, value in params.items() if key not in head_keys}
    x = jax.ShapeDtypeStruct((rows, length, local_cfg.d_model), jnp.dtype(local_cfg.dtype))
    targets = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((rows, length), jnp.float32)

    def loss(differentiable, fixed):
        (head, x), (rest, targets, mask) = differentiable, fixed
        model = nnx.merge(graphdef, {**rest, **head})
        normed = model.final_norm(x)
        if loss_chunk:
            sums, _ = chunked_cross_entropy_sums(model.head(), normed, targets, mask, z_loss, loss_chunk)
        else:
            sums = cross_entropy_sums(model.head()(normed), targets, mask, z_loss)
        return sums["cross_entropy"] + sums["z_loss"]

    return walked_bytes(loss, (head, x), (rest, targets, mask), with_forward=True,
                        operands_fused=operands_fused)


def kv_bytes(local_cfg: ml_collections.ConfigDict, batch: int, length: int,
             itemsize: int | None = None) -> float:
    """Keys and values of one attention layer over `length` tokens (compute dtype unless itemsize)."""
    itemsize = itemsize or jnp.dtype(local_cfg.dtype).itemsize
    return 2 * batch * length * local_cfg.num_kv_heads * local_cfg.head_dim * itemsize


def flash_temporaries(local_cfg: ml_collections.ConfigDict, batch: int, local_length: int,
                      block: int) -> float:
    """The flash kernel's live temporaries for one device's queries: the backward's fp32 scores,
    probabilities and their gradients of one (query block, key block) pair, and its fp32 query-gradient
    accumulator (the forward's running output is smaller). Never an [L, L] score matrix."""
    heads = local_cfg.num_heads
    pair = 4 * batch * heads * block * block
    return FP32_BYTES * (pair + batch * heads * local_length * local_cfg.head_dim)


def context_working_set(local_cfg: ml_collections.ConfigDict, cp: ContextParallel, batch: int,
                        length: int) -> tuple[float, str]:
    """(bytes, note): what one attention layer's backward holds on top of its residuals under context
    parallelism; layers run one after another, so one layer's worth per device."""
    local = length // cp.shards
    if cp.strategy == "ulysses":
        # Each shard attends all `length` tokens for 1/S of the heads: the kernel's fp32 dK/dV hold a local
        # shard's worth of elements; the q/k/v gradients then go back through the all-to-all.
        heads, kv_heads = local_cfg.num_heads, local_cfg.num_kv_heads
        split_heads = ml_collections.ConfigDict({**local_cfg.to_dict(), "num_heads": heads // cp.shards})
        kernel = flash_temporaries(split_heads, batch, length, cp.block)
        held = kv_bytes(local_cfg, batch, local, FP32_BYTES) + kv_bytes(local_cfg, batch, local) * (
            1 + heads / (2 * kv_heads))
        return held + kernel, (f"ulysses: fp32 dK/dV of {length} tokens x 1/{cp.shards} of the heads + "
                               f"dQ/dK/dV through the all-to-all {format_bytes(held)}; flash "
                               f"{cp.block}x{cp.block} temporaries {format_bytes(kernel)}")
    kernel = flash_temporaries(local_cfg, batch, local, cp.block)
    if cp.strategy == "ring":
        # The backward's second ring: the key/value block in flight beside the held one, and the fp32
        # key/value gradient accumulators that travel with the blocks (the held and the incoming one).
        ring = kv_bytes(local_cfg, batch, local) + 2 * kv_bytes(local_cfg, batch, local, FP32_BYTES)
        return ring + kernel, (f"ring: one {local}-token K/V block in flight + fp32 dK/dV accumulators "
                               f"(held + in flight) {format_bytes(ring)}; flash {cp.block}x{cp.block} "
                               f"temporaries {format_bytes(kernel)}")
    # all_gather: the kernel's fp32 gradients of the gathered keys and values, full length, until the
    # reduce-scatter that the gather's transpose is.
    gathered = kv_bytes(local_cfg, batch, length, FP32_BYTES)
    return gathered + kernel, (f"all_gather: fp32 dK/dV over all {length} tokens {format_bytes(gathered)}; "
                               f"flash {cp.block}x{cp.block} temporaries {format_bytes(kernel)}")


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


# ---------------------------------------------------------------------------------------- estimate


def megatron_estimate(run: Run, layout: Layout) -> MegatronEstimate | None:
    """Fujii et al.'s formula (bf16 activations, flash attention, sequence parallel), for the families
    it describes (dense decoders). With p pipeline stages: L/p layers per device and, as for 1F1B's
    first stage, p microbatches in flight of L/p layers each (the embedding and head split p ways, as
    our rules split them)."""
    config = run.config
    m = config.model
    if not run.family.megatron_formula:
        return None
    shape = layout.mesh.shape
    h, ffn, layers, vocab = m.d_model, m.mlp_dim, m.num_layers, m.vocab_size
    a, k = m.num_heads, m.num_kv_heads
    t, c, d = shape["tensor"], shape["sequence"], shape["fsdp"]
    p = shape.get(STAGE_AXIS, 1)
    plan = pipeline_plan(m, layout, run.family.num_blocks(m))
    seq = config.train.seq_len
    b = config.train.global_batch_size // config.train.microbatches // layout.divisor("act_batch")
    b //= plan.microbatches if plan is not None else 1
    psi = layers / p * ((2 * h * h + 2 * h * h * k / a + 3 * h * ffn) / t + 2 * h)
    psi += vocab * h / (t * p) * (1 if m.tie_embeddings else 2) + h
    activations = seq * b * h * (12 + 4 * k / a + 8 * ffn / h) / (t * c) * layers
    logits = (4 + 2) * seq * b * vocab / (t * p)
    communicators = COMMUNICATOR_BYTES * sum(1 for size in shape.values() if size > 1)
    return MegatronEstimate(psi, 16 * psi / d, activations, logits, communicators)


def estimate_memory(config: ml_collections.ConfigDict, num_devices: int, *, device: str | None = "h100",
                    device_memory_gib: float | None = None, host_kernels: bool = False) -> MemoryEstimate:
    """Per-device bytes of one training step of `config` on `num_devices` devices.

    device / device_memory_gib: the accelerator whose memory the 80% rule uses (table or explicit size).
    host_kernels: see `block_activations` (True only to compare with a compile on this host).
    """
    run = build_run(config, num_devices=num_devices)
    device_name, device_memory = device_memory_bytes(device, device_memory_gib)
    m, train = config.model, config.train
    layout = Layout(run.mesh, run.rules)
    num_blocks = run.family.num_blocks(m)
    params = parameter_bytes(run, layout, num_blocks)
    fp32_shards = params.stored_bytes
    items = [
        MemoryItem("parameters", fp32_shards, f"fp32, {format_count(params.count)}, sharded by rules"),
        MemoryItem("gradients", fp32_shards, "fp32, laid out like the parameters"),
        MemoryItem("optimizer states", params.optimizer_bytes,
                   "AdamW mu + nu (fp32), step counts, RNG key, guard windows"),
    ]
    if train.microbatches > 1:
        items.append(MemoryItem("gradient accumulation", fp32_shards,
                                f"fp32 running sum over {train.microbatches} microbatches"))
    frozen = run.objective.frozen_models(config)  # DPO's reference, a distillation teacher of any size
    if frozen:
        counts = ", ".join(format_count(frozen_parameter_count(model_cfg)) for model_cfg in frozen)
        frozen_bytes = sum(frozen_parameter_bytes(model_cfg, layout) for model_cfg in frozen)
        items.append(MemoryItem("frozen parameters", frozen_bytes,
                                f"{len(frozen)} frozen fp32 model(s) of train.objective="
                                f"{run.objective.name!r} ({counts}), sharded by rules"))
    items += activation_items(run, layout, params, num_blocks, host_kernels, device_platform(device_name))
    mesh_sizes = {axis: int(layout.mesh.shape[axis]) for axis in MESH_AXES}
    return MemoryEstimate(config.get("name", "config"), num_devices, mesh_sizes, m.remat, tuple(items),
                          device_name, device_memory, megatron_estimate(run, layout))


def activation_items(run: Run, layout: Layout, params: ParameterBytes, num_blocks: int,
                     host_kernels: bool, kernel_platform: str = "tpu") -> list[MemoryItem]:
    """Everything that scales with the batch: inputs, residuals, working sets, logits.

    An objective that scores several sequences per example (DPO: chosen and rejected) runs them as
    rows of one forward pass; a frozen model's forward (DPO's reference) keeps no residuals, so the
    policy's working set bounds it.
    """
    config, family, objective = run.config, run.family, run.objective
    m, train = config.model, config.train
    dtype_bytes = jnp.dtype(m.dtype).itemsize
    examples = -(-train.global_batch_size // layout.divisor("act_batch"))
    rows = examples * objective.sequences_per_example
    batch = -(-rows // train.microbatches)
    length = layout.local(train.seq_len, "act_length")
    tokens = batch * length
    local_cfg = local_model_config(m, family, layout)
    cp = context_parallel(m, layout, train.seq_len)
    plan = pipeline_plan(m, layout, num_blocks)
    head_tokens = tokens  # the LM head and the loss run on the whole (accumulation) batch after the stack
    if plan is not None:  # each iteration runs K blocks on one microbatch's rows
        batch = -(-batch // plan.microbatches)
        tokens = batch * length
    if plan is not None and m.remat == "save_dots":
        local_cfg.remat = "full"  # inside the pipeline save_dots keeps what full keeps
    # the TPU compiler fuses elementwise producers into matmuls; GEMM libraries (GPU, CPU) read memory
    operands_fused = kernel_platform == "tpu" and not host_kernels
    blocks = block_activations(family, local_cfg, batch, train.seq_len, layout.divisor("act_length"),
                               host_kernels, cp, kernel_platform)
    saved = blocks.residuals[m.remat]
    carry = dtype_bytes * tokens * m.d_model  # the scan keeps every block's input
    dispatch = family.dispatch_bytes(m, layout.divisor, tokens)
    dispatch_saved = dispatch if m.remat == "none" else 0.0
    if plan is None:
        kept = MemoryItem("activations saved for backward", num_blocks * (saved + carry + dispatch_saved),
                          f"{num_blocks} blocks x ({format_bytes(saved)} residuals under remat {m.remat!r} + "
                          f"{format_bytes(carry)} scan carry)")
        pipeline_items = []
    else:
        # inside the pipeline save_dots keeps what full keeps (pipelined_stack.iteration_policy)
        block_saved = saved + dispatch_saved if m.remat == "none" else 0.0
        kept, pipeline_items = pipeline_activation_items(plan, block_saved, carry)
        stage_blocks = FP32_BYTES * params.block_stored_elements * (num_blocks // plan.stages)
        if plan.repeats > 1:  # the circular schedule regathers the stage's blocks (and their gradients)
            pipeline_items.append(MemoryItem("circular schedule's stage-major blocks", 2 * stage_blocks,
                                             "fp32 copy of this stage's blocks in stage-major order + its "
                                             "gradient"))
        copies = data_copies(dict(layout.mesh.shape), layout.rules, family.rows_independent,
                             rows * layout.divisor("act_batch") // train.microbatches // plan.microbatches)
        if copies > 1:
            pipeline_items.append(MemoryItem("pipeline weight copies per data shard", 2 * stage_blocks,
                                             f"this shard's fp32 copy of the stage's blocks ({copies} data "
                                             "shards) + its gradient, reduced once after the loop"))
    # FSDP all-gathers one block's weights in compute dtype (their fp32 gradients, written before the
    # reduce-scatter, are in the walked backward); without FSDP a bf16 copy is made of fp32 weights.
    gathers = params.block_compute_elements > params.block_stored_elements
    cast_bytes = dtype_bytes if gathers or dtype_bytes != FP32_BYTES else 0
    block_weights = params.block_compute_elements * cast_bytes
    local_vocab = layout.local(m.vocab_size, "act_vocab")
    # train.loss_chunk: one chunk of positions' logits at a time (train/losses.py), not under sequence
    # parallelism (the positions are sharded there)
    chunked = train.loss_chunk and layout.divisor("act_length") == 1 and train.seq_len > train.loss_chunk
    head = head_and_loss_bytes(local_cfg, local_vocab, head_tokens // length, length,
                               train.loss_chunk if chunked else 0, train.z_loss,
                               operands_fused=operands_fused)
    input_bytes = sum(batch_layout.dtype_of(key).itemsize for key in objective.batch_keys) * examples * length
    items = [
        MemoryItem("input batch", input_bytes, f"{', '.join(batch_layout.FIELDS)} per sequence"),
        kept,
        *pipeline_items,
    ]
    if blocks.family_part and family.memory_part is not None:
        where = "saved in every block" if m.remat == "none" else "part of the block backward"
        items.append(MemoryItem(family.memory_part.label, blocks.family_part,
                                f"one block's {family.memory_part.what} residuals, {where}", counted=False,
                                phase=None if m.remat == "none" else BLOCK_PHASE))
    items += [
        MemoryItem("block backward working set", blocks.backward,
                   f"one block's backward{' with its recomputation' * (m.remat != 'none')}, walked "
                   "(estimate/liveness.py): temporaries and fp32 weight gradients before their reduction",
                   phase=BLOCK_PHASE),
        MemoryItem("gathered block weights", block_weights, "one block's weights in compute dtype",
                   phase=BLOCK_PHASE),
    ]
    if dispatch:
        saved_per_block = m.remat == "none"
        items.append(MemoryItem("MoE all-to-all dispatch buffers", dispatch,
                                f"one block, {layout.divisor('expert')} expert shards"
                                + ("; saved in every block (in the activations above)" * saved_per_block),
                                counted=not saved_per_block, phase=None if saved_per_block else BLOCK_PHASE))
    if cp.active:
        working, note = context_working_set(local_cfg, cp, batch, train.seq_len)
        items.append(MemoryItem(f"context parallel attention ({cp.shards} shards)", working, note,
                                phase=BLOCK_PHASE))
    items += [
        MemoryItem("LM head weights gathered", params.head_compute_elements * dtype_bytes,
                   "the head (or tied embedding) in compute dtype; the input embedding is read in place",
                   phase=HEAD_PHASE),
        MemoryItem("logits, loss and head gradient", head,
                   "walked: final norm, fp32 logits of the vocabulary shard"
                   + (f" ({train.loss_chunk} of {train.seq_len} positions at a time)" if chunked else "")
                   + ", loss gradients, fp32 head gradient before its reduction", phase=HEAD_PHASE),
    ]
    return items


def pipeline_plan(model_cfg: ml_collections.ConfigDict, layout: Layout,
                  num_blocks: int) -> PipelinePlan | None:
    stages = int(layout.mesh.shape.get(STAGE_AXIS, 1))
    settings = PipelineSettings.from_config(model_cfg)
    return None if stages == 1 else settings.plan(num_blocks, stages, model_cfg.num_layers)


def pipeline_activation_items(plan: PipelinePlan, block_saved: float,
                              microbatch_carry: float) -> tuple[MemoryItem, list[MemoryItem]]:
    """What the pipeline keeps (models/pipelined_stack.py), per device, on one microbatch's rows.

    Every stage runs at every one of the R*M+S-1 iterations (the bubble's runs are discarded but traced
    alike), so each device keeps the residuals of all iterations, the first stage no more than the last:
    per iteration its K blocks' inputs and what model.remat saves of them, or with
    model.pipeline_remat_iterations only the stage input, the K blocks' share then being recomputed
    during one iteration's backward. The stream of M microbatch activations (replicated over the stages)
    and its cotangent live through the step, next to the held, output and rolled stage buffers.
    """
    k = plan.blocks_per_chunk
    stage_blocks = k * (block_saved + microbatch_carry)
    shape = (f"{plan.iterations} pipeline iterations (S={plan.stages}, M={plan.microbatches}, "
             f"R={plan.repeats})")
    if plan.remat_iterations:
        kept = MemoryItem("activations saved for backward", plan.iterations * microbatch_carry,
                          f"{shape} x {format_bytes(microbatch_carry)} stage input, one microbatch each")
        extra = [MemoryItem("pipeline iteration recompute", stage_blocks,
                            f"one iteration's {k} blocks recomputed: inputs + saved residuals")]
    else:
        kept = MemoryItem("activations saved for backward", plan.iterations * stage_blocks,
                          f"{shape} x {k} blocks x ({format_bytes(block_saved)} residuals + "
                          f"{format_bytes(microbatch_carry)} input), one microbatch each")
        extra = []
    stream = 2 * plan.microbatches * microbatch_carry
    buffers = MemoryItem("pipeline buffers", stream + 3 * microbatch_carry,
                         f"stream of {plan.microbatches} microbatches + its cotangent, "
                         "held / output / rolled stage activations")
    return kept, [buffers, *extra]


# ------------------------------------------------------------------------------------- XLA's view


@dataclasses.dataclass(frozen=True)
class XlaMemory:
    argument: int
    output: int
    alias: int
    temp: int
    compiler_peak: int = 0  # the compiler's own peak of live bytes (peak_memory_in_bytes), 0 if not given

    @property
    def allocated(self) -> int:
        """Arguments + temporaries (outputs alias the donated state)."""
        return self.argument + self.temp

    @property
    def peak(self) -> int:
        """The most the program holds at once: the compiler's own figure where it gives one. The TPU
        compiler's temporaries count regions it overlaps: it accepted llama3_8b at 12 sequences per v5p
        chip with arguments + temporaries of 102.9 GiB > 95 GiB HBM, its peak being 76.3 GiB."""
        return self.compiler_peak or self.allocated


def xla_memory_of(analysis, *, with_compiler_peak: bool = False) -> XlaMemory:
    """XlaMemory from a compiled executable's memory_analysis(). with_compiler_peak: take its
    peak_memory_in_bytes (the TPU compiler's is its live peak; XLA CPU's leaves the temporaries out)."""
    peak = int(getattr(analysis, "peak_memory_in_bytes", 0) or 0) if with_compiler_peak else 0
    return XlaMemory(analysis.argument_size_in_bytes, analysis.output_size_in_bytes,
                     analysis.alias_size_in_bytes, analysis.temp_size_in_bytes, peak)


def xla_memory(config: ml_collections.ConfigDict, devices: Sequence | None = None) -> XlaMemory:
    """Compile the real train step abstractly for `devices` and read XLA's per-device memory analysis."""
    run = build_run(config, list(devices if devices is not None else jax.devices()))
    with sharding_context(run.mesh, run.rules):
        lowered = run.step.lower(run.abstract_state(), run.abstract_batch(), run.abstract_frozen())
        return xla_memory_of(lowered.compile().memory_analysis())
