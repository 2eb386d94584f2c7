"""Peak live bytes of a traced program, with elementwise chains fused the way XLA fuses them.

The memory estimator needs what one block's backward pass holds at its worst moment. JAX's residual
list says what the forward keeps, not what the backward allocates; XLA decides that, and it never
writes out most elementwise results: a chain of adds, casts, exponentials, selects and broadcasts is
fused into the operation that consumes it and recomputed there. So this walks a jaxpr in program order
as a heap would: an equation of an op that XLA gives a buffer (a matmul, a reduction, a gather, a
kernel, a loop) allocates its outputs, an elementwise equation allocates nothing and passes on the
buffers it reads, a buffer is freed after its last reader, and the peak of the running sum is the
answer. Call-like equations (jit, remat, custom derivatives) are walked in place; a loop adds its
body's own peak on top of what is live around it.

It is a model of XLA, not XLA: the real scheduler may order independent ops differently and pad or
copy arrays for layouts. `tests/test_liveness.py` checks it against hand-counted programs; the
estimator's tests check what it yields against XLA's and the TPU compiler's memory analyses.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax.extend import core as jax_core

# Ops XLA fuses into their consumers: their results get no buffer of their own.
FUSED = frozenset({
    "abs", "add", "add_any", "and", "atan2", "bitcast_convert_type", "broadcast_in_dim", "cbrt", "ceil",
    "clamp", "convert_element_type", "copy", "copy_p", "cos", "div", "eq", "erf", "erf_inv", "exp", "exp2",
    "expand_dims", "expm1", "floor", "ge", "gt", "imag", "integer_pow", "iota", "is_finite", "le", "log",
    "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real",
    "reduce_precision", "rem", "reshape", "round", "rsqrt", "select_n", "shift_left",
    "shift_right_arithmetic", "shift_right_logical", "sign", "sin", "sqrt", "square", "squeeze",
    "stop_gradient", "sub", "tan", "tanh", "transpose", "xor",
})
# Call-like ops whose body runs where they stand; the parameter names that hold the body.
INLINED_BODY_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
INLINED = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
                     "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "shard_map"})
# Fused ops that only re-index one array: their result is that array's buffer seen another way.
LAYOUT = frozenset({"reshape", "squeeze", "expand_dims", "transpose", "copy", "copy_p"})
# Ops that update an operand: XLA writes them in place when the operand is read for the last time.
UPDATES = frozenset({"scatter", "scatter-add", "scatter_add", "scatter-mul", "dynamic_update_slice"})
MATMULS = frozenset({"dot_general", "conv_general_dilated", "ragged_dot", "ragged_dot_general"})
LOOPS = {"scan": ("jaxpr",), "while": ("body_jaxpr", "cond_jaxpr")}


def array_bytes(aval) -> int:
    shape = getattr(aval, "shape", None)
    return 0 if shape is None else math.prod(shape) * jnp.dtype(aval.dtype).itemsize


def _open(jaxpr):
    """The Jaxpr of a Jaxpr or ClosedJaxpr."""
    return getattr(jaxpr, "jaxpr", jaxpr)


class _Buffer:
    """One allocation: the array of one variable of one run of a (possibly inlined) jaxpr."""

    __slots__ = ("bytes",)

    def __init__(self, aval):
        self.bytes = array_bytes(aval)


@dataclasses.dataclass
class _Step:
    outputs: list[_Buffer]  # what this step allocates
    reads: set[_Buffer]  # the buffers it reads (through fused chains)
    transient: int  # bytes it needs only while it runs (a loop body's own peak)
    in_place: bool = False  # an output may take over a same-sized buffer it reads for the last time


def _body(eqn):
    for name in INLINED_BODY_PARAMS:
        if eqn.params.get(name) is not None:
            return _open(eqn.params[name])
    return None


def _matmul_readers(jaxpr, known: dict) -> dict:
    """Variable -> how many matmuls read it, directly, through reshapes and transposes of it, or inside
    the call-like equations it is passed to. known: id(jaxpr) -> its answer, filled as bodies are
    counted, so that a body is counted once however deeply it is nested or however often it is called."""
    if id(jaxpr) in known:
        return known[id(jaxpr)]
    alias: dict = {}  # a reshape / transpose result -> the variable it views
    readers: dict = {}

    def root(var):
        while var in alias:
            var = alias[var]
        return var

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        operands = [var for var in eqn.invars if not isinstance(var, jax_core.Literal)]
        body = _body(eqn) if name in INLINED else None
        if body is not None:
            inner = _matmul_readers(body, known)
            for inner_var, var in zip(body.invars, eqn.invars, strict=True):
                if not isinstance(var, jax_core.Literal) and inner.get(inner_var):
                    readers[root(var)] = readers.get(root(var), 0) + inner[inner_var]
        elif name in LAYOUT and operands:
            for out in eqn.outvars:
                alias[out] = operands[0]
        elif name in MATMULS:
            for var in {root(var) for var in operands}:
                readers[var] = readers.get(var, 0) + 1
    known[id(jaxpr)] = readers
    return readers


def _flatten(jaxpr, env: dict, steps: list[_Step], owned: dict, matmul_operands_fused: bool,
             readers: dict) -> None:
    """Append the steps of `jaxpr` to `steps`, call-like equations inlined with fresh buffers per call.

    env: variable -> the buffers its value is made from (one of its own, or a fused chain's sources);
    owned: variable -> the buffer allocated for it alone (a reshape or transpose of one is a view of it);
    matmul_operands_fused: see `peak_bytes`; readers: `_matmul_readers`'s answers known so far."""

    def reads_of(variables) -> set[_Buffer]:
        found = set()
        for var in variables:
            if not isinstance(var, jax_core.Literal):
                found |= env.get(var, set())
        return found

    # The TPU compiler fuses an elementwise chain into the operand of the matmul that reads it, but a
    # chain that several matmuls read (a gradient that makes both the input's and the weight's
    # gradient) is written out once rather than recomputed in each.
    shared = ({var for var, count in _matmul_readers(jaxpr, readers).items() if count > 1}
              if matmul_operands_fused else set())
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        body = _body(eqn) if name in INLINED else None
        if body is not None:
            arguments = [(inner_var, var) for inner_var, var in zip(body.invars, eqn.invars, strict=True)
                         if not isinstance(var, jax_core.Literal)]
            inner = {inner_var: env.get(var, set()) for inner_var, var in arguments}
            inner_owned = {inner_var: owned[var] for inner_var, var in arguments if var in owned}
            _flatten(body, inner, steps, inner_owned, matmul_operands_fused, readers)
            for out, inner_out in zip(eqn.outvars, body.outvars, strict=True):
                if isinstance(inner_out, jax_core.Literal):
                    env[out] = set()
                    continue
                env[out] = inner.get(inner_out, set())
                if inner_out in inner_owned:
                    owned[out] = inner_owned[inner_out]
            continue
        if name in FUSED:
            reads = reads_of(eqn.invars)
            view = name in LAYOUT and eqn.invars[0] in owned
            for out in eqn.outvars:
                env[out] = reads
                if view:
                    owned[out] = owned[eqn.invars[0]]
                elif out in shared:
                    buffer = _Buffer(out.aval)
                    steps.append(_Step([buffer], reads, 0, in_place=True))
                    env[out], owned[out] = {buffer}, buffer
            continue
        if name in MATMULS and not matmul_operands_fused:
            for var in eqn.invars:  # a GEMM library call reads operands from memory: chains are written out
                if not isinstance(var, jax_core.Literal) and var not in owned:
                    buffer = _Buffer(var.aval)
                    steps.append(_Step([buffer], env.get(var, set()), 0, in_place=True))
                    env[var], owned[var] = {buffer}, buffer
        reads = reads_of(eqn.invars)
        transient = 0
        if name in LOOPS:
            transient = max(peak_bytes(eqn.params[key], matmul_operands_fused=matmul_operands_fused)
                            for key in LOOPS[name] if eqn.params.get(key) is not None)
        elif name == "cond":
            transient = max(peak_bytes(branch, matmul_operands_fused=matmul_operands_fused)
                            for branch in eqn.params["branches"])
        outputs = []
        for out in eqn.outvars:
            buffer = _Buffer(out.aval)
            env[out], owned[out] = {buffer}, buffer
            outputs.append(buffer)
        steps.append(_Step(outputs, reads, transient, in_place=name in UPDATES))


def _needed(steps: list[_Step], results: set[_Buffer]) -> list[_Step]:
    """The steps whose outputs reach a result: XLA drops the rest (e.g. a gradient that a custom
    derivative computes and discards)."""
    wanted, kept = set(results), []
    for step in reversed(steps):
        if any(buffer in wanted for buffer in step.outputs):
            wanted.update(step.reads)
            kept.append(step)
    return kept[::-1]


def peak_bytes(jaxpr, *, count_inputs: bool = False, keep_results: bool = True,
               matmul_operands_fused: bool = True) -> int:
    """The largest sum of live buffers while `jaxpr` (a Jaxpr or ClosedJaxpr) runs.

    matmul_operands_fused: the TPU compiler fuses elementwise producers into a matmul's operands
    (True); XLA's CPU and GPU backends call a GEMM library on operands in memory, so a fused chain
    feeding a matmul is written out first (False), unless it only reshapes or transposes one buffer.
    count_inputs: include the program's inputs (False: they are held by whoever calls it).
    keep_results: results stay live to the end (False: each is handed on as soon as it is written, as a
    block's weight gradients are reduce-scattered into their shards). A result that a fused chain
    computes is written to a buffer of its own at the end of the chain.
    """
    steps, inputs, results = _schedule(_open(jaxpr), matmul_operands_fused)
    return _simulate(steps, inputs, results if keep_results else set(), count_inputs)


def _schedule(jaxpr, matmul_operands_fused: bool) -> tuple[list[_Step], set[_Buffer], set[_Buffer]]:
    """(the steps that reach a result, in program order; the input buffers; the result buffers)."""
    env = {var: {_Buffer(var.aval)} for var in jaxpr.invars}
    inputs = set().union(*env.values()) if env else set()
    owned = {var: next(iter(buffers)) for var, buffers in env.items()}
    steps: list[_Step] = []
    _flatten(jaxpr, env, steps, owned, matmul_operands_fused, {})
    results: set[_Buffer] = set()
    written_at = {buffer: index for index, step in enumerate(steps) for buffer in step.outputs}
    materialise: dict[int, list[_Step]] = {}
    for var in jaxpr.outvars:
        if isinstance(var, jax_core.Literal):
            continue
        if var in owned:
            results.add(owned[var])
            continue
        # written as soon as the last buffer its chain reads exists
        buffer, sources = _Buffer(var.aval), env.get(var, set())
        after = max((written_at.get(source, -1) for source in sources), default=-1)
        materialise.setdefault(after, []).append(_Step([buffer], sources, 0, in_place=True))
        results.add(buffer)
    steps = [*materialise.get(-1, []),
             *(step for index, own in enumerate(steps) for step in (own, *materialise.get(index, [])))]
    return _needed(steps, results), inputs, results


def _simulate(steps: list[_Step], inputs: set[_Buffer], held: set[_Buffer], count_inputs: bool) -> int:
    """Run the steps as a heap: outputs allocated, buffers freed after their last reader unless held to
    the end, an in-place step's output written over a same-sized operand it reads for the last time."""
    last_read = {buffer: index for index, step in enumerate(steps) for buffer in step.reads}
    live = {buffer for buffer in inputs if buffer in last_read or buffer in held}
    current = sum(buffer.bytes for buffer in live) if count_inputs else 0
    peak = current
    for index, step in enumerate(steps):
        dying = [buffer for buffer in step.reads
                 if last_read[buffer] == index and buffer in live and buffer not in held]
        reusable = [buffer for buffer in dying if step.in_place and buffer not in inputs]
        for buffer in step.outputs:
            same = next((old for old in reusable if old.bytes == buffer.bytes), None)
            if same is not None:  # handed over to the output, whose bytes are counted below
                reusable.remove(same)
                dying.remove(same)
                live.discard(same)
                current -= same.bytes
        peak = max(peak, current + sum(buffer.bytes for buffer in step.outputs) + step.transient)
        for buffer in step.outputs:
            if buffer in last_read or buffer in held:
                live.add(buffer)
                current += buffer.bytes
        for buffer in dying:
            live.discard(buffer)
            if count_inputs or buffer not in inputs:
                current -= buffer.bytes
    return peak
