"""Ahead-of-time compilation of the real train step for a TPU topology, on a host without TPUs.

    topology = get_topology("v5p:4x4x4")            # 64 compile-only v5p chips (needs libtpu)
    result = compile_for_topology(config, topology)  # abstract state only: nothing is allocated
    print(result.report())

libtpu's compiler runs here on the CPU: `jax.experimental.topologies` gives devices that can be
compiled for but not run on, the run is built on them through `build_run` (the recipe's mesh and
rules), and its jitted step is lowered with the abstract state, batch and frozen models and compiled
by the real TPU compiler. Its memory analysis is what the chip would hold; the memory estimator's
figure is set next to it. The TPU compiler rejects a program that does not fit in HBM: that is
reported as "does not fit" with the compiler's own numbers, not raised.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from pathlib import Path

import jax
import ml_collections
from jax.experimental import serialize_executable, topologies

from plamo_jax.errors import ConfigError
from plamo_jax.estimate import memory
from plamo_jax.models import kernels
from plamo_jax.parallel.rules import MESH_AXES, sharding_context
from plamo_jax.train import peak_flops
from plamo_jax.train.run import Run, build_run

GIB = memory.GIB
# generation -> chip dimensions of a topology name ("v5e:2x2", "v5p:4x4x4"): v5e / v6e are 2D tori,
# v4 / v5p 3D. The names are libtpu's own.
DIMENSIONS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
# v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore"); without this
# libtpu describes a v4 slice core by core (8 devices for 2x2x1), which no training job uses.
MEGACORE = ("v4", "v5p")
# HBM bandwidth per chip, bytes/s, from Google's Cloud TPU pages (v4: 1200 GBps, v5e: 819 GBps,
# v5p: 2765 GBps, v6e: 1638 GBps); HBM capacity is memory.DEVICE_MEMORY_GIB, bf16 peak FLOP/s
# peak_flops.VENDOR_PEAKS, so each figure has one table.
HBM_BANDWIDTH = {"v4": 1200e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1638e9}
# libtpu reads these when it first loads; without them it asks a cloud metadata server that is not
# there and logs warnings about worker hostnames. ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu takes
# /tmp/libtpu_lockfile to keep a second process off the chips; compiling touches no chip, and
# without it a second compile (another test worker, another user's tool) fails at once.
# Only defaults: a TPU VM's own settings win.
LIBTPU_QUIET_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
ACCELERATOR_TYPE = {"v4": "v4-8", "v5e": "v5litepod-8", "v5p": "v5p-8", "v6e": "v6e-8"}
ARGUMENT_ITEMS = ("parameters", "optimizer states", "input batch", "frozen parameters")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
SENT_PER_RESULT_BYTE = {"all-gather": 0.5, "reduce-scatter": 1.0, "all-reduce": 1.0, "all-to-all": 0.5,
                        "collective-permute": 1.0}
# Interconnect bytes per second per chip, one direction: half the bidirectional ICI bandwidth Google's
# Cloud TPU pages give (v5e 400 GBps, v5p 1200 GBps, v6e 800 GBps); for v4, whose page gives none,
# the pod's all-reduce bandwidth (1.1 PB/s) over its 4096 chips. DCN: v5p 50 Gbps per chip, v5e two
# 100 Gbps NICs per 8-chip host; the others are not given per chip.
ICI_BANDWIDTH = {"v4": 1.1e15 / 4096, "v5e": 200e9, "v5p": 600e9, "v6e": 400e9}
DCN_BANDWIDTH = {"v5e": 2 * 100e9 / 8 / 8, "v5p": 50e9 / 8}
_NAME = re.compile(r"^(?P<generation>v[0-9a-z]+):(?P<shape>[0-9]+(?:x[0-9]+)*)$")
_HLO_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e\w+|bf16|f16|f32|f64)\[([0-9,]*)\]")
_HLO_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
              "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def tpu_compiler_available() -> bool:
    """Whether libtpu (the `tpu` extra: jax[tpu] at the pinned jax) is installed."""
    return importlib.util.find_spec("libtpu") is not None


@dataclasses.dataclass(frozen=True)
class Topology:
    """Compile-only devices of a TPU slice (or of `num_slices` slices joined over the data-centre network)."""

    name: str
    generation: str
    num_slices: int
    devices: tuple

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def label(self) -> str:
        return self.name if self.num_slices == 1 else f"{self.num_slices} x {self.name}"

    @property
    def hbm_bytes(self) -> float:
        return memory.DEVICE_MEMORY_GIB[self.generation] * GIB

    @property
    def peak_flops(self) -> float | None:
        return peak_flops.vendor_peak(self.devices[0].device_kind, "bfloat16")


def parse_topology_name(name: str) -> tuple[str, tuple[int, ...]]:
    """("v5p", (4, 4, 4)) from "v5p:4x4x4"; ConfigError naming what is expected otherwise."""
    match = _NAME.match(name.strip().lower())
    expected = "expected GENERATION:SHAPE with GENERATION one of " + ", ".join(DIMENSIONS) + \
        " (e.g. v5e:2x2, v5p:2x2x1, v5p:4x4x4, v6e:4x4)"
    if not match or match["generation"] not in DIMENSIONS:
        raise ConfigError(f"--topology={name!r}: {expected}")
    generation, shape = match["generation"], tuple(int(d) for d in match["shape"].split("x"))
    if len(shape) != DIMENSIONS[generation] or min(shape) < 1:
        raise ConfigError(f"--topology={name!r}: a {generation} slice has {DIMENSIONS[generation]} positive "
                          f"chip dimensions; {expected}")
    return generation, shape


def get_topology(name: str, num_slices: int = 1) -> Topology:
    """The compile-only devices of topology `name` x `num_slices`; ConfigError for a name libtpu rejects."""
    generation, shape = parse_topology_name(name)
    if num_slices < 1:
        raise ConfigError(f"--num-slices={num_slices}: expected a positive number of slices")
    if not tpu_compiler_available():
        raise ConfigError(f"--topology={name}: compiling for TPU needs libtpu; install the tpu extra "
                          f"(pip install 'jax[tpu]=={jax.__version__}')")
    for key, value in {**LIBTPU_QUIET_ENV, "TPU_ACCELERATOR_TYPE": ACCELERATOR_TYPE[generation]}.items():
        os.environ.setdefault(key, value)
    options = {"chip_config_name": "megacore"} if generation in MEGACORE else {}
    canonical = f"{generation}:{'x'.join(map(str, shape))}"
    try:
        description = topologies.get_topology_desc(topology_name=canonical, platform="tpu",
                                                   num_slices=num_slices, **options)
    except jax.errors.JaxRuntimeError as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"--topology={name!r}: libtpu rejects it ({reason}); expected a slice shape "
                          "Cloud TPU offers, e.g. v5p:2x2x1, v5p:4x4x4, v5e:4x4") from None
    return Topology(canonical, generation, num_slices, tuple(description.devices))


# ------------------------------------------------------------------------------------------ compile


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    count: int  # ops in the optimized program (a scanned loop's body counts once)
    bytes: float  # their result bytes per chip, summed the same way
    per_step: int = 0  # ops executed per step (each times its loops' trip counts)
    per_step_bytes: float = 0.0  # their result bytes per chip per step

    @property
    def sent_bytes(self) -> float:
        """A lower bound on the bytes each chip sends per step for these ops, whatever the group size
        n >= 2: ring algorithms send 2(n-1)/n of an all-reduce (>= 1x), (n-1)/n of an all-gather's or
        all-to-all's result (>= 1/2), (n-1) times a reduce-scatter's result (>= 1x), a permute's whole."""
        return self.per_step_bytes * SENT_PER_RESULT_BYTE[self.kind]


@dataclasses.dataclass(frozen=True)
class AotResult:
    config_name: str
    topology: Topology
    mesh_sizes: dict[str, int]
    lower_seconds: float
    compile_seconds: float
    xla: memory.XlaMemory | None  # None when the compiler found the step too big for HBM
    oom_message: str | None  # the compiler's own words then
    estimate: memory.MemoryEstimate
    xla_flops: float | None  # cost_analysis of the per-chip program (scan bodies count once)
    xla_bytes_accessed: float | None
    model_flops: float  # the model formula's FLOPs per chip per step (forward + backward)
    collectives: tuple[Collective, ...]
    hlo_text: str | None  # the optimized per-chip HLO module
    unrolled: bool = False  # the layer scan was unrolled, so XLA's FLOPs count every layer
    dcn_data: int = 1  # slices the data axis spans (mesh.dcn_data)
    stablehlo_text: str | None = None  # what was handed to the compiler, when artifacts were asked for
    executable: bytes | None = None  # serialize_executable's payload, when artifacts were asked for

    @property
    def fits(self) -> bool:
        return self.xla is not None and self.xla.peak <= self.topology.hbm_bytes

    @property
    def estimated_arguments(self) -> float:
        """The estimate's share that XLA counts as arguments: the state, the batch, frozen models."""
        return sum(item.bytes for item in self.estimate.items if item.name in ARGUMENT_ITEMS)

    @property
    def ratio(self) -> float | None:
        """Estimate / compiled peak."""
        return None if self.xla is None else self.estimate.total / max(self.xla.peak, 1)

    def roofline_seconds(self) -> dict[str, float]:
        """Lower bounds on one step's time, each alone: "compute" (FLOPs at the bf16 peak), "HBM" (XLA's
        bytes accessed at the HBM bandwidth), "ICI" (what each chip must send for the program's
        collectives, per step, at its interconnect bandwidth) and "DCN" (across slices of a
        multi-slice data axis, each chip's gradient shard at least once). An estimate, not a
        prediction: the step takes at least the largest of them.

        The FLOPs are the larger of XLA's count and the model formula: XLA counts a scanned layer
        loop's body once (unless --unroll), the formula leaves out recomputation and the optimizer;
        XLA's bytes accessed also count a loop body once. Collectives that cross slices other than
        the data axis's are counted at ICI speed: the bound stays a lower one.
        """
        generation = self.topology.generation
        bounds = {}
        peak = self.topology.peak_flops
        if peak:
            bounds["compute"] = max(self.xla_flops or 0.0, self.model_flops) / peak
        if self.xla_bytes_accessed:
            bounds["HBM"] = self.xla_bytes_accessed / HBM_BANDWIDTH[generation]
        sent = sum(collective.sent_bytes for collective in self.collectives)
        if sent:
            bounds["ICI"] = sent / ICI_BANDWIDTH[generation]
        if self.dcn_data > 1 and generation in DCN_BANDWIDTH:
            bounds["DCN"] = self.estimate.bytes_of("gradients") / DCN_BANDWIDTH[generation]
        return bounds

    def report(self) -> str:
        return "\n".join(report_lines(self))


def compile_for_topology(config: ml_collections.ConfigDict, topology: Topology, *,
                         artifacts: bool = False) -> AotResult:
    """Lower and compile `config`'s train step for `topology` (its mesh must use every chip).

    artifacts: also keep the StableHLO handed to the compiler and the serialized executable (for
    --dump; loading it needs the same jax, libtpu and topology).
    """
    count = topology.chips
    multislice = math.prod(int(config.mesh.get(f"dcn_{axis}", 1)) for axis in MESH_AXES)
    if multislice != topology.num_slices:
        raise ConfigError(f"config keys mesh.dcn_*: they multiply to {multislice} but the topology has "
                          f"{topology.num_slices} slice(s); expected e.g. --config.mesh.dcn_data="
                          f"{topology.num_slices}")
    estimate = memory.estimate_memory(config, count, device=topology.generation)
    start = time.perf_counter()
    run = build_run(config, topology.devices)
    # Trace the kernels TPUs run (e.g. ragged grouped matmuls for MoE), not this host's CPU fallbacks.
    with kernels.kernels_for("tpu"), sharding_context(run.mesh, run.rules):
        lowered = run.step.lower(run.abstract_state(), run.abstract_batch(), run.abstract_frozen())
        lowered_at = time.perf_counter()
        try:
            compiled, oom = lowered.compile(), None
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            compiled, oom = None, _oom_summary(str(error))
    done = time.perf_counter()
    xla = cost = None
    text = None
    if compiled is not None:
        xla = memory.xla_memory_of(compiled.memory_analysis(), with_compiler_peak=True)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        text = compiled.as_text()
    return AotResult(
        config_name=config.get("name", "config"), topology=topology,
        mesh_sizes={axis: int(run.mesh.shape[axis]) for axis in MESH_AXES},
        lower_seconds=lowered_at - start, compile_seconds=done - lowered_at, xla=xla, oom_message=oom,
        estimate=estimate,
        xla_flops=float(cost["flops"]) if cost and "flops" in cost else None,
        xla_bytes_accessed=float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None,
        model_flops=model_flops_per_chip(run),
        collectives=collectives(text) if text else (),
        hlo_text=text,
        unrolled=(not config.model.scan_layers
                  or int(config.model.scan_unroll) >= int(config.model.num_layers)),
        dcn_data=int(config.mesh.get("dcn_data", 1)),
        stablehlo_text=lowered.as_text() if artifacts else None,
        executable=_serialized(compiled) if artifacts and compiled is not None else None,
    )


def model_flops_per_chip(run: Run) -> float:
    return run.flops_per_token * run.tokens_per_step / len(run.mesh.devices.flat)


def _serialized(compiled) -> bytes:
    payload, _, _ = serialize_executable.serialize(compiled)
    return payload


def _oom_summary(message: str) -> str:
    """The compiler's first sentence ("Ran out of memory on HBM, ... required ... exceeds available
    HBM (15.75G)"); the rest of its message runs to pages of buffer listings."""
    return "the TPU compiler: " + message.strip().splitlines()[0][:400]


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """({computation name: its lines}, the entry computation's name) of an HLO module's text."""
    computations: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%(\S+) ", line)
        if header and line.rstrip().endswith("{"):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current is not None:
            computations[current].append(line)
    return computations, entry


_CALLS = re.compile(r"(?:body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%[\w.\-]+)")


def _called(lines: list[str]) -> set[str]:
    return set(re.findall(r"%([\w.\-]+)", " ".join(_CALLS.findall("\n".join(lines)))))


def _trip_count(loop: str, condition: list[str]) -> int:
    """Iterations of a while loop: the trip count XLA noted on it, else (the TPU compiler's text has no
    backend notes) its condition's comparison of the counter with a constant (`i < N`, as every scan
    lowers to); 1 when the condition has another form."""
    noted = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop)
    if noted:
        return int(noted.group(1))
    constants = dict(re.findall(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(condition)))
    for line in condition:
        compare = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
        if compare and compare.group(1) in constants:
            return int(constants[compare.group(1)])
    return 1


def runs_per_step(hlo_text: str) -> dict[str, int]:
    """How many times each computation runs in one execution of the module: a while loop's body and
    condition run its trip count times per run of the computation holding the loop."""
    computations, entry = _computations(hlo_text)
    if entry is None:  # a fragment (e.g. `inside_loops`): every computation once
        return dict.fromkeys(computations, 1)
    runs = {entry: 1}
    pending = [entry]
    while pending:
        name = pending.pop()
        for line in computations.get(name, ()):
            loop = re.search(r"condition=%([\w.\-]+), body=%([\w.\-]+)", line)
            times = runs[name] * (_trip_count(line, computations.get(loop.group(1), [])) if loop else 1)
            for callee in _called([line]):
                if callee in computations and runs.get(callee, 0) < times:
                    runs[callee] = times
                    pending.append(callee)
    return runs


def collectives(hlo_text: str) -> tuple[Collective, ...]:
    """Count and result bytes of each collective kind in an optimized HLO module's text, as written
    (a loop body once) and per execution (each op times the runs of its computation, `runs_per_step`).

    Asynchronous pairs (`all-gather-start` / `all-gather-done`) count once, at their start; the
    result shape of a start op includes its operand, so only the last array of a tuple is taken.
    """
    computations, _ = _computations(hlo_text)
    runs = runs_per_step(hlo_text)
    found = {kind: [0, 0.0, 0, 0.0] for kind in COLLECTIVES}
    for name, lines in (computations or {"": hlo_text.splitlines()}).items():
        times = runs.get(name, 1)
        for line in lines:
            head, sep, rest = line.partition(" = ")
            if not sep:
                continue
            for kind in COLLECTIVES:
                # "%ag = bf16[8,128]{1,0} all-gather(...)" or "... all-gather-start(...)"
                op = re.search(rf"\s{kind}(-start)?\(", rest)
                if op is None:
                    continue
                arrays = _HLO_ARRAY.findall(rest[: op.start()])
                if op.group(1) and len(arrays) > 1:
                    arrays = arrays[len(arrays) // 2:]  # (operands..., results...)
                size = sum(_HLO_BYTES.get(dtype, 1) * math.prod(int(d) for d in dims.split(",") if d)
                           for dtype, dims in arrays)
                found[kind][0] += 1
                found[kind][1] += size
                found[kind][2] += times
                found[kind][3] += size * times
                break
    return tuple(Collective(kind, count, size, per_step, per_step_bytes)
                 for kind, (count, size, per_step, per_step_bytes) in found.items() if count)


def inside_loops(hlo_text: str) -> str:
    """The text of the computations a `while` loop runs (its bodies and what they call, transitively):
    `collectives(inside_loops(text))` are the collectives paid once per iteration."""
    computations, _ = _computations(hlo_text)
    called = {name: _called(lines) for name, lines in computations.items()}
    pending = list(set(re.findall(r"body=%([\w.\-]+)", hlo_text)))
    reached: set[str] = set()
    while pending:
        name = pending.pop()
        if name not in reached:
            reached.add(name)
            pending.extend(called.get(name, ()))
    return "\n".join(line for name in sorted(reached) for line in computations.get(name, ()))


# ------------------------------------------------------------------------------------------- report


def report_lines(result: AotResult) -> list[str]:
    fmt = memory.format_bytes
    topology, estimate = result.topology, result.estimate
    used = " x ".join(f"{axis}={size}" for axis, size in result.mesh_sizes.items() if size > 1) or "1 chip"
    hbm = topology.hbm_bytes
    kind = topology.devices[0].device_kind
    lines = [f"{result.config_name} on {topology.label} ({topology.chips} x {kind}), mesh {used}",
             f"lowered in {result.lower_seconds:.1f} s, compiled by the TPU compiler in "
             f"{result.compile_seconds:.1f} s"]
    if result.xla is None:
        lines.append(f"does NOT fit: {result.oom_message} (chip HBM {hbm / GIB:.0f} GiB)")
        lines.append(f"memory estimator: {fmt(estimate.total)} per chip ({estimate.total / hbm:.0%} of HBM)")
        return lines
    xla = result.xla
    lines += [
        f"{'per chip':34s} {'XLA':>12s} {'estimate':>12s} {'ratio':>7s}",
        _row("arguments (state, batch, frozen)", xla.argument, result.estimated_arguments),
        _row("outputs (aliased to donated state)", xla.output, None),
        _row("temporaries", xla.temp, None),
        _row("arguments + temporaries", xla.allocated, None),
        _row("peak (the compiler's, live buffers)", xla.peak, estimate.total),
        f"HBM {hbm / GIB:.0f} GiB per chip: peak is {xla.peak / hbm:.0%} -> "
        + ("fits" if result.fits else "does NOT fit")
        + (f"; within the 80% rule ({memory.SAFETY_FRACTION * hbm / GIB:.1f} GiB)"
           if xla.peak <= memory.SAFETY_FRACTION * hbm else "; above the 80% rule"),
    ]
    model = result.model_flops
    if result.xla_flops:
        how = "layers unrolled" if result.unrolled else \
            "a scanned layer loop counts once; --unroll counts every layer"
        lines.append(f"FLOPs per chip per step: XLA {result.xla_flops:.3e} ({how}), "
                     f"model formula {model:.3e}")
    else:
        lines.append(f"FLOPs per chip per step: model formula {model:.3e} (no XLA cost analysis)")
    bounds = result.roofline_seconds()
    if bounds:
        bound = max(bounds.values())
        parts = ", ".join(f"{what} {seconds * 1e3:.2f} ms" for what, seconds in bounds.items())
        ceiling = f"; MFU ceiling {model / (bound * topology.peak_flops):.0%}" if topology.peak_flops else ""
        lines.append(f"roofline estimate, step time >= {bound * 1e3:.2f} ms ({parts}){ceiling}")
    if result.collectives:
        lines.append("collectives per step (ops, result bytes per chip; in the program text): "
                     + ", ".join(f"{c.kind} {c.per_step} ({fmt(c.per_step_bytes)}; {c.count} ops)"
                                 for c in result.collectives))
    return lines


def _row(name: str, xla: float, estimate: float | None) -> str:
    fmt = memory.format_bytes
    if estimate is None:
        return f"{name:34s} {fmt(xla):>12s}"
    return f"{name:34s} {fmt(xla):>12s} {fmt(estimate):>12s} {estimate / max(xla, 1):7.2f}"


def write_dump(result: AotResult, directory: str | Path) -> list[Path]:
    """The optimized HLO, the StableHLO and the serialized executable (those kept) under `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result.config_name}.{result.topology.label.replace(' ', '').replace(':', '-')}"
    written = []
    for suffix, content in ((".hlo.txt", result.hlo_text), (".stablehlo.mlir", result.stablehlo_text)):
        if content:
            path = out / f"{stem}{suffix}"
            path.write_text(content)
            written.append(path)
    if result.executable is not None:
        path = out / f"{stem}.executable"
        path.write_bytes(result.executable)
        written.append(path)
    return written


def mesh_overrides(spec: str) -> dict[str, int]:
    """{"fsdp": 4, "tensor": 2} from "fsdp=4,tensor=2" (a --mesh flag); ConfigError otherwise."""
    sizes = {}
    for part in (p for p in spec.split(",") if p.strip()):
        axis, sep, value = part.partition("=")
        axis = axis.strip()
        if not sep or (axis not in MESH_AXES and axis.removeprefix("dcn_") not in MESH_AXES):
            raise ConfigError(f"--mesh={spec!r}: expected AXIS=SIZE,... with AXIS one of "
                              f"{', '.join(MESH_AXES)} (or dcn_AXIS)")
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh={spec!r}: size {value!r} of {axis} is not an integer") from None
    return sizes


def apply_mesh(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> None:
    """Set the mesh sizes of `sizes`; the axes not named keep the recipe's values."""
    for axis, size in sizes.items():
        if axis not in config.mesh:
            raise ConfigError(f"--mesh {axis}={size}: the recipe has no key mesh.{axis}; expected one of "
                              f"{', '.join(k for k in config.mesh.keys() if k != 'rules')}")
        config.mesh[axis] = size


def unroll_layers(config: ml_collections.ConfigDict) -> None:
    """Unroll the layer scan so XLA's cost analysis counts every layer (it counts a loop body once);
    compiling takes longer, roughly in proportion to depth."""
    config.model.scan_unroll = max(1, int(config.model.num_layers))
