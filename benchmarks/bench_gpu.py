"""One NVIDIA GPU, every figure of issue 18: MFU per family, cuDNN attention, FP8 GEMMs, MoE kernels.

    bash benchmarks/gpu_check.sh [OUT_DIR]   # on the GPU machine: all of it, about 6 minutes on an H200
    python benchmarks/bench_gpu.py smoke     # on CPU: the same flow on tiny shapes (no cuDNN, no FP8 GEMM)

Subcommands (gpu_check.sh runs them in this order, each family in its own process so that the device's
peak-memory counter belongs to that family's first run):
  checks        bf16 matmul ceiling; cuDNN attention against dense attention on the GPU (values and
                gradients) and the three kernels' speed; FP8: the cuBLASLt FP8 custom calls in the compiled
                HLO, numerics and speed of one projection; MoE: the grouped matmul (`ragged_dot`) against a
                batched matmul of the same FLOPs, and the dispatch around it.
  family NAME   dense | hybrid | moe: training steps of the family's ~1B model with each attention kernel
                (and FP8 for dense): step time, tokens/s, MFU against the vendor peak and the measured
                ceiling, XLA's memory figure, the device's peak memory beside the memory estimator's.
  report        the Markdown table of everything measured (also written to OUT/gpu_check.md).

Every result is one JSON line in OUT/results.jsonl; a failing measurement records its error and the rest
go on.

The models: dense = configs/llama3_1b.py (Llama-3.2-1B shape); hybrid = configs/plamo2_1b.py (PLaMo 2 1B:
Mamba2 SSD + 2048-token sliding-window attention); moe = SMALL_MOE below (1.75B parameters, 0.33B active:
32 experts, top-4). Batches are synthetic (one document per row, as MFU figures of other projects are).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import seconds_per_call  # noqa: E402
from bench_train import synthetic_batch  # noqa: E402

from plamo_jax.configuration import load_recipe  # noqa: E402
from plamo_jax.estimate.memory import estimate_memory  # noqa: E402
from plamo_jax.models import fp8 as fp8_lib  # noqa: E402
from plamo_jax.models.attention import dot_product_attention_with_max_logit  # noqa: E402
from plamo_jax.models.cudnn_attention import cudnn_attention_with_max_logit  # noqa: E402
from plamo_jax.models.experts import local_moe, ragged_swiglu  # noqa: E402
from plamo_jax.models.flash_attention import flash_attention_with_max_logit  # noqa: E402
from plamo_jax.models.masks import attention_mask  # noqa: E402
from plamo_jax.parallel.rules import sharding_context  # noqa: E402
from plamo_jax.train import peak_flops  # noqa: E402
from plamo_jax.train import state as state_lib  # noqa: E402
from plamo_jax.train.run import build_run  # noqa: E402

GIB = 2**30
FP8_CALL = "__cublas$lt$matmul$f8"
CUDNN_ATTENTION_CALL = "__cudnn$fmha"
BF16_TOLERANCE = 2e-2  # relative to the reference's largest magnitude: a few bf16 ulps after sums

SMALL_MOE = {  # on configs/moe_tiny.py
    "vocab_size": 32000, "d_model": 1024, "num_layers": 16, "num_heads": 16, "num_kv_heads": 4,
    "head_dim": 64, "num_experts": 32, "num_experts_per_token": 4, "expert_mlp_dim": 1024,
    "dtype": "bfloat16", "tie_embeddings": False,
}


@dataclasses.dataclass(frozen=True)
class ModelCase:
    family: str
    label: str
    recipe: str
    model: dict
    batch: int
    seq_len: int


def model_cases(family: str, smoke: bool) -> list[ModelCase]:
    """The runs of one family; the first one's peak memory is compared with the estimate."""
    if smoke:  # tiny shapes, the kernels a CPU has
        tiny = {"dense": ("configs/tiny.py", {}), "hybrid": ("configs/plamo2_tiny.py", {}),
                "moe": ("configs/moe_tiny.py", {})}[family]
        return [ModelCase(family, f"{family} {impl}", tiny[0], {**tiny[1], "attention_impl": impl}, 2, 64)
                for impl in ("dense", "flash")] + (
            [ModelCase(family, "dense fp8", tiny[0], {"fp8": True}, 2, 64)] if family == "dense" else [])
    if family == "dense":
        recipe = "configs/llama3_1b.py"
        return [ModelCase(family, "llama3_1b cudnn", recipe, {"attention_impl": "cudnn"}, 4, 2048),
                ModelCase(family, "llama3_1b cudnn fp8", recipe, {"attention_impl": "cudnn", "fp8": True},
                          4, 2048),
                ModelCase(family, "llama3_1b flash", recipe, {"attention_impl": "flash"}, 4, 2048),
                # dense scores hold [B, H, L, L] probabilities per layer: B=4 does not fit in 141 GB
                ModelCase(family, "llama3_1b dense b2", recipe, {"attention_impl": "dense"}, 2, 2048)]
    if family == "hybrid":
        recipe = "configs/plamo2_1b.py"
        return [ModelCase(family, "plamo2_1b cudnn", recipe, {"attention_impl": "cudnn"}, 2, 4096),
                ModelCase(family, "plamo2_1b flash", recipe, {"attention_impl": "flash"}, 2, 4096),
                # [B, H, L, L] probabilities of 4096 tokens: B=2 would not fit
                ModelCase(family, "plamo2_1b dense b1", recipe, {"attention_impl": "dense"}, 1, 4096)]
    if family == "moe":
        recipe = "configs/moe_tiny.py"
        return [ModelCase(family, f"moe_1.7b {impl}", recipe, {**SMALL_MOE, "attention_impl": impl}, 8, 2048)
                for impl in ("cudnn", "flash")]
    raise SystemExit(f"family {family!r}: expected dense, hybrid or moe")


# ---------------------------------------------------------------------------------------- plumbing


class Results:
    """Appends one JSON object per measurement to OUT/results.jsonl and prints it."""

    def __init__(self, out: Path):
        self.path = out / "results.jsonl"
        out.mkdir(parents=True, exist_ok=True)

    def add(self, kind: str, **fields) -> None:
        record = {"kind": kind, **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    def guarded(self, kind: str, label: str, fn) -> None:
        """Run fn(); on failure record the error (one line) and go on with the next measurement."""
        start = time.perf_counter()
        try:
            fn()
        except Exception as error:  # a failing measurement must not cost the others
            traceback.print_exc()
            self.add(kind, label=label, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}",
                     seconds=round(time.perf_counter() - start, 1))


def read_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def relative_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    return float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def vendor_peak(dtype: str = "bfloat16") -> float:
    """The peak table's figure for this device, the H200's (the machine this script is written for)
    where the table has none."""
    listed = peak_flops.vendor_peak(jax.devices()[0].device_kind, dtype)
    return listed or peak_flops.VENDOR_PEAKS["h200"][dtype]


def peak_bytes() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ------------------------------------------------------------------------------------------ checks


def environment(results: Results) -> None:
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    results.add("environment", date=datetime.date.today().isoformat(), device=device.device_kind,
                platform=device.platform, devices=jax.device_count(), python=platform.python_version(),
                jax=jax.__version__, jaxlib=jaxlib.__version__,
                flax=flax.__version__, optax=optax.__version__,
                cudnn=_cudnn_version(), vendor_bf16_peak=vendor_peak())


def _cudnn_version():
    try:
        from jax._src.lib import cuda_versions  # the version JAX itself checks cuDNN attention against
        return cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:  # CPU-only jaxlib
        return None


def matmul_ceiling(results: Results, smoke: bool) -> None:
    """The measured bf16 ceiling: the best of peak_flops' calibration matmuls (random operands)."""
    n = 512 if smoke else 8192
    results.add("matmul_ceiling", n=n, flops_per_second=peak_flops.measure_matmul_flops("bfloat16", size=n))


def attention_inputs(batch, length, heads, kv_heads, head_dim, documents: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.bfloat16)
    upstream = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    segments = np.repeat(np.arange(1, documents + 1), -(-length // documents))[:length]
    return q, k, v, jnp.asarray(np.broadcast_to(segments, (batch, length)).astype(np.int32)), upstream


def cudnn_numerics(results: Results, smoke: bool) -> None:
    """cuDNN against the dense path (fp32 softmax) on the same bf16 inputs: output, dq, dk, dv."""
    for case, window, documents in (("causal", 0, 1), ("packed 3 documents", 0, 3),
                                    ("window 512 + documents", 512, 3), ("traced window", None, 2)):
        cudnn_case(results, smoke, case, window, documents)


def cudnn_case(results: Results, smoke: bool, case: str, window: int | None, documents: int) -> None:
    length = 128 if smoke else 2048
    impl = "xla" if smoke else "cudnn"  # JAX's reference path with the same arguments on CPU
    q, k, v, segments, upstream = attention_inputs(2, length, 16, 4, 128, documents)

    def loss(fn, q, k, v, window):
        out, max_logit = fn(q, k, v, window)
        return jnp.sum(out.astype(jnp.float32) * upstream), (out, max_logit)

    cudnn = lambda q, k, v, w: cudnn_attention_with_max_logit(q, k, v, segments, w, implementation=impl)
    dense = lambda q, k, v, w: dot_product_attention_with_max_logit(q, k, v, attention_mask(segments, w))
    if window is None:  # a traced window: the mask path
        args = (q, k, v, jnp.int32(256))
        objective = lambda fn: lambda q, k, v, w: loss(fn, q, k, v, w)
    else:
        args = (q, k, v)
        objective = lambda fn: lambda q, k, v: loss(fn, q, k, v, window)
    got_fn, want_fn = (jax.jit(jax.grad(objective(fn), argnums=(0, 1, 2), has_aux=True))
                       .lower(*args).compile() for fn in (cudnn, dense))
    (got_grads, (got, got_max)), (want_grads, (want, want_max)) = got_fn(*args), want_fn(*args)
    hlo = got_fn.as_text()
    errors = {"out": relative_error(got, want)}
    errors.update({f"d{name}": relative_error(g, e)
                   for name, g, e in zip("qkv", got_grads, want_grads, strict=True)})
    max_logit_ok = abs(float(got_max) - float(want_max)) <= 1e-3 * abs(float(want_max))
    results.add("cudnn_numerics", case=case, length=length, errors=errors,
                max_logit=[float(got_max), float(want_max)], cudnn_calls=hlo.count(CUDNN_ATTENTION_CALL),
                passed=all(e < BF16_TOLERANCE for e in errors.values()) and max_logit_ok)


def attention_speed(results: Results, smoke: bool) -> None:
    """Forward + backward of one attention layer of llama3_1b's shape: 4 x 2048 tokens, 32 query and 8
    key/value heads of 64."""
    length = 128 if smoke else 2048
    q, k, v, segments, upstream = attention_inputs(4, length, 32, 8, 64, 1)
    kernels = {
        "dense": lambda q, k, v: dot_product_attention_with_max_logit(q, k, v, attention_mask(segments)),
        "flash": lambda q, k, v: flash_attention_with_max_logit(q, k, v, segments, 0, 512, None),
    }
    if not smoke:
        kernels["cudnn"] = lambda q, k, v: cudnn_attention_with_max_logit(q, k, v, segments, 0)
    # causal attention FLOPs, forward + backward: 4 * B * H * L^2 * D / 2 forward, 2.5x that backward
    flops = 3.5 * 4 * 4 * 32 * length**2 * 64 / 2
    for name, kernel in kernels.items():
        fn = jax.jit(jax.grad(lambda q, k, v, kernel=kernel: jnp.sum(
            kernel(q, k, v)[0].astype(jnp.float32) * upstream), argnums=(0, 1, 2)))
        seconds = seconds_per_call(fn, q, k, v, repeats=10)
        results.add("attention_speed", kernel=name, seconds=seconds, flops_per_second=flops / seconds)


def fp8_check(results: Results, smoke: bool) -> None:
    """One MLP projection of llama3_1b at 8192 tokens: FP8 custom calls in the compiled forward and
    backward, the FP8 product against the same rounded operands multiplied in fp32, and speed."""
    tokens, d_model, width = (256, 128, 256) if smoke else (8192, 2048, 8192)
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (tokens, d_model), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (d_model, width), jnp.float32) * 0.02).astype(jnp.bfloat16)
    upstream = jax.random.normal(keys[2], (tokens, width), jnp.bfloat16)

    def step(einsum):
        def loss(x, w):
            return jnp.sum(einsum(x, w).astype(jnp.float32) * upstream)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    fp8_step = step(lambda x, w: fp8_lib.fp8_einsum("td,df->tf", x, w, jnp.bfloat16)).lower(x, w).compile()
    bf16_step = step(lambda x, w: jnp.einsum("td,df->tf", x, w))
    hlo = fp8_step.as_text()
    forward = jax.jit(lambda x, w: fp8_lib.fp8_einsum("td,df->tf", x, w, jnp.bfloat16))(x, w)
    rounded = [fp8_lib.quantize_dequantize(a, fp8_lib.FORWARD_DTYPE).astype(jnp.float32) for a in (x, w)]
    reference = jnp.matmul(*rounded, precision=jax.lax.Precision.HIGHEST)
    fp8_seconds = seconds_per_call(fp8_step, x, w, repeats=10)
    bf16_seconds = seconds_per_call(bf16_step, x, w, repeats=10)
    results.add("fp8_projection", shape=[tokens, d_model, width], fp8_gemm_calls=hlo.count(FP8_CALL),
                expected_calls=3, forward_error_vs_fp32_of_rounded=relative_error(forward, reference),
                fp8_seconds=fp8_seconds, bf16_seconds=bf16_seconds, speedup=bf16_seconds / fp8_seconds,
                fp8_flops_per_second=3 * 2 * tokens * d_model * width / fp8_seconds)


def moe_kernels(results: Results, smoke: bool) -> None:
    """The expert MLP of SMALL_MOE on one step's tokens, forward + backward: ragged_dot grouped matmuls
    on balanced groups, a batched matmul of exactly the same FLOPs (what a grouped kernel can reach),
    and local_moe with random routing (sort, gather, grouped matmuls, scatter, combine)."""
    m = SMALL_MOE
    tokens = 256 if smoke else 8 * 2048
    experts, top_k = m["num_experts"], m["num_experts_per_token"]
    d_model, width = m["d_model"], m["expert_mlp_dim"]
    if smoke:
        experts, d_model, width = 8, 64, 64
    rows = tokens * top_k
    keys = jax.random.split(jax.random.key(2), 6)
    weights = [(jax.random.normal(k, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
               for k, shape in zip(keys[:3], [(experts, d_model, width)] * 2 + [(experts, width, d_model)],
                                   strict=True)]
    x_rows = jax.random.normal(keys[3], (rows, d_model), jnp.bfloat16)
    group_sizes = jnp.full((experts,), rows // experts, jnp.int32)

    def grad_of(fn):
        loss = lambda x, *w: jnp.sum(fn(x, *w).astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

    ragged = grad_of(lambda x, g, u, d: ragged_swiglu(x, group_sizes, g, u, d))
    ragged = ragged.lower(x_rows, *weights).compile()

    def batched(x, g, u, d):
        xe = x.reshape(experts, rows // experts, d_model)
        h = jax.nn.silu(jnp.einsum("erd,edf->erf", xe, g)) * jnp.einsum("erd,edf->erf", xe, u)
        return jnp.einsum("erf,efd->erd", h, d).reshape(rows, d_model)

    x_tokens = jax.random.normal(keys[4], (tokens, d_model), jnp.bfloat16)
    experts_tk = jax.random.randint(keys[5], (tokens, top_k), 0, experts)
    gates_tk = jnp.full((tokens, top_k), 1.0 / top_k, jnp.float32)
    keep_tk = jnp.ones((tokens, top_k), bool)
    routed = grad_of(lambda x, g, u, d: local_moe(x, experts_tk, gates_tk, keep_tk, g, u, d))
    flops = 3 * 3 * 2 * rows * d_model * width  # three matmuls, forward + two backward products each
    ragged_s = seconds_per_call(ragged, x_rows, *weights, repeats=10)
    batched_s = seconds_per_call(grad_of(batched), x_rows, *weights, repeats=10)
    routed_s = seconds_per_call(routed, x_tokens, *weights, repeats=10)
    ragged_hlo = ragged.as_text()
    results.add("moe_kernels", tokens=tokens, experts=experts, top_k=top_k, d_model=d_model, width=width,
                ragged_seconds=ragged_s, batched_seconds=batched_s, local_moe_seconds=routed_s,
                dispatch_seconds=routed_s - ragged_s,
                ragged_flops_per_second=flops / ragged_s, batched_flops_per_second=flops / batched_s,
                ragged_ops={op: ragged_hlo.count(op)
                            for op in ("ragged-dot", "custom-call", " dot(", "while")})


# ------------------------------------------------------------------------------------------ models


def build_case(case: ModelCase):
    config = load_recipe(case.recipe)
    for key, value in case.model.items():
        config.model[key] = value
    config.train.global_batch_size, config.train.seq_len = case.batch, case.seq_len
    config.train.microbatches = 1
    return config, build_run(config)


def run_family(results: Results, family: str, smoke: bool, steps: int, ceiling: float | None) -> None:
    """Trace every case, then compile and measure the first (so its figures land even if time runs out,
    and XLA's GEMM autotuning times kernels on an idle GPU, filling the process's autotuning cache with
    the GEMM shapes the others mostly share), then compile the rest side by side (XLA compiles in C++,
    outside the GIL) and measure them one after another."""
    cases = model_cases(family, smoke)
    built, lowered = {}, {}
    for case in cases:  # tracing is Python: one after another
        def lower(case=case):
            config, run = build_case(case)
            with sharding_context(run.mesh, run.rules):
                lowered[case.label] = run.step.lower(run.abstract_state(), run.abstract_batch(), None)
            built[case.label] = (config, run)
        results.guarded("model", case.label, lower)
    compiled = {}

    def compile_case(label):
        start = time.perf_counter()
        try:
            compiled[label] = (lowered[label].compile(), time.perf_counter() - start)
        except Exception as error:
            results.add("model", label=label, error=f"compile: {type(error).__name__}: {str(error)[:300]}")

    labels = [case.label for case in cases if case.label in lowered]
    for group in (labels[:1], labels[1:]):
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(len(group), 1)) as pool:
            list(pool.map(compile_case, group))
        for case in cases:
            if case.label in group and case.label in compiled:
                executable, compile_seconds = compiled[case.label]
                results.guarded("model", case.label, lambda case=case, executable=executable,
                                compile_seconds=compile_seconds: measure_case(
                                    results, case, *built[case.label], executable, steps, ceiling,
                                    case is cases[0], compile_seconds))


def measure_case(results, case, config, run, executable, steps, ceiling, first, compile_seconds) -> None:
    with sharding_context(run.mesh, run.rules):
        state = run.fresh_state()
        batch = jax.device_put(synthetic_batch(case.batch, case.seq_len, config.model.vocab_size),
                               run.batch_sharding)
        for _ in range(2):  # warm-up
            state, metrics = executable(state, batch, None)
        first_loss = float(jax.device_get(metrics["loss"]))
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = executable(state, batch, None)
        final_loss = float(jax.device_get(metrics["loss"]))
        seconds = (time.perf_counter() - start) / steps
    peak = peak_bytes() if first else None
    memory = executable.memory_analysis()
    xla_bytes = None
    if memory is not None:
        xla_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                     - memory.alias_size_in_bytes)
    estimate = estimate_memory(config, 1, device="h200").total
    hlo = executable.as_text()
    model_flops = run.flops_per_token * run.tokens_per_step
    vendor = vendor_peak()
    results.add(
        "model", family=case.family, label=case.label, batch=case.batch, seq_len=case.seq_len,
        parameters=state_lib.parameter_count(run.setup.abstract_params), step_seconds=seconds,
        tokens_per_second=run.tokens_per_step / seconds, model_flops_per_step=model_flops,
        mfu_vendor=model_flops / seconds / vendor,
        mfu_ceiling=model_flops / seconds / ceiling if ceiling else None,
        loss=[first_loss, final_loss], xla_bytes=xla_bytes, peak_bytes=peak, estimate_bytes=estimate,
        fp8_gemm_calls=hlo.count(FP8_CALL), cudnn_attention_calls=hlo.count(CUDNN_ATTENTION_CALL),
        compile_seconds=compile_seconds)
    del state, metrics, batch
    gc.collect()


# ------------------------------------------------------------------------------------------ report


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def report(out: Path) -> str:
    records = read_results(out)
    env = next((r for r in records if r["kind"] == "environment"), {})
    ceiling = next((r for r in records if r["kind"] == "matmul_ceiling" and "error" not in r), None)
    lines = [f"Measured {env.get('date')} on {env.get('devices')} x {env.get('device')} "
             f"(jax {env.get('jax')}, flax {env.get('flax')}, cuDNN {env.get('cudnn')}, "
             f"Python {env.get('python')}).",
             ""]
    if ceiling:
        lines.append(f"bf16 matmul ceiling ({ceiling['n']}^3, random data): "
                     f"{ceiling['flops_per_second'] / 1e12:.0f} TFLOP/s; vendor peak "
                     f"{env.get('vendor_bf16_peak', 0) / 1e12:.0f} TFLOP/s.")
        lines.append("")
    lines += ["| run | batch x length | step (ms) | tokens/s | MFU (vendor) | MFU (ceiling) | XLA GiB | "
              "peak GiB | estimate GiB | FP8 GEMMs | cuDNN calls |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["kind"] != "model":
            continue
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:120]} |||||||||")
            continue
        mfu_ceiling = "-" if r["mfu_ceiling"] is None else f"{r['mfu_ceiling']:.1%}"
        lines.append(f"| {r['label']} | {r['batch']} x {r['seq_len']} | {r['step_seconds'] * 1e3:.1f} | "
                     f"{r['tokens_per_second']:,.0f} | {r['mfu_vendor']:.1%} | {mfu_ceiling} | "
                     f"{_gib(r['xla_bytes'])} | {_gib(r['peak_bytes'])} | {_gib(r['estimate_bytes'])} | "
                     f"{r['fp8_gemm_calls']} | {r['cudnn_attention_calls']} |")
    lines.append("")
    for r in records:
        if "error" in r and r["kind"] != "model":
            lines.append(f"- {r['kind']} {r.get('label', '')}: ERROR {r['error']}")
        elif r["kind"] == "cudnn_numerics":
            lines.append(f"- cuDNN vs dense, {r['case']} ({r['length']} tokens): "
                         + ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items())
                         + f"; max logit {r['max_logit'][0]:.4f} vs {r['max_logit'][1]:.4f}; "
                         f"{r['cudnn_calls']} cuDNN calls; {'PASS' if r['passed'] else 'FAIL'}")
        elif r["kind"] == "attention_speed":
            lines.append(f"- attention fwd+bwd, 4 x 2048 x 32 heads: {r['kernel']} "
                         f"{r['seconds'] * 1e3:.2f} ms ({r['flops_per_second'] / 1e12:.0f} TFLOP/s causal)")
        elif r["kind"] == "fp8_projection":
            lines.append(f"- FP8 projection {r['shape']}: {r['fp8_gemm_calls']} of {r['expected_calls']} "
                         f"dots are cuBLASLt FP8 GEMMs; error vs fp32 product of the rounded operands "
                         f"{r['forward_error_vs_fp32_of_rounded']:.2e}; fwd+bwd "
                         f"{r['fp8_seconds'] * 1e3:.2f} ms vs bf16 {r['bf16_seconds'] * 1e3:.2f} ms: "
                         f"{r['speedup']:.2f}x")
        elif r["kind"] == "moe_kernels":
            lines.append(f"- MoE experts fwd+bwd ({r['tokens']} tokens, {r['experts']} experts, "
                         f"top-{r['top_k']}, "
                         f"{r['d_model']} -> {r['width']}): ragged_dot "
                         f"{r['ragged_seconds'] * 1e3:.2f} ms "
                         f"({r['ragged_flops_per_second'] / 1e12:.0f} TFLOP/s), batched matmul of the same "
                         f"FLOPs {r['batched_seconds'] * 1e3:.2f} ms "
                         f"({r['batched_flops_per_second'] / 1e12:.0f} TFLOP/s), local_moe with routing "
                         f"{r['local_moe_seconds'] * 1e3:.2f} ms "
                         f"(dispatch {r['dispatch_seconds'] * 1e3:.2f} ms); "
                         f"compiled ops {r['ragged_ops']}")
    moe_step = next((r for r in records
                     if r["kind"] == "model" and r.get("family") == "moe" and "error" not in r), None)
    moe = next((r for r in records if r["kind"] == "moe_kernels" and "error" not in r), None)
    if moe_step and moe:
        layers = SMALL_MOE["num_layers"]
        share = lambda s: layers * s / moe_step["step_seconds"]
        lines.append(f"- MoE step share ({layers} layers x per-layer time / {moe_step['label']} step): "
                     f"grouped matmuls {share(moe['ragged_seconds']):.0%}, "
                     f"dispatch {share(moe['dispatch_seconds']):.0%}; "
                     f"a grouped kernel at the batched-matmul rate would save "
                     f"{share(moe['ragged_seconds'] - moe['batched_seconds']):.0%} of the step")
    text = "\n".join(lines)
    (out / "gpu_check.md").write_text(text + "\n")
    return text


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["checks", "family", "report", "smoke"])
    parser.add_argument("family", nargs="?", choices=["dense", "hybrid", "moe"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (CPU): checks the flow, not the GPU")
    args = parser.parse_args()
    results = Results(args.out)
    smoke = args.smoke or args.command == "smoke"
    if args.command in ("checks", "smoke"):
        results.guarded("environment", "", lambda: environment(results))
        for kind, fn in (("matmul_ceiling", matmul_ceiling), ("cudnn_numerics", cudnn_numerics),
                         ("attention_speed", attention_speed), ("fp8_projection", fp8_check),
                         ("moe_kernels", moe_kernels)):
            results.guarded(kind, "", lambda fn=fn: fn(results, smoke))
    families = [args.family] if args.command == "family" else ["dense", "hybrid", "moe"] if smoke else []
    for family in families:
        ceiling = next((r["flops_per_second"] for r in read_results(args.out)
                        if r["kind"] == "matmul_ceiling" and "error" not in r), None)
        run_family(results, family, smoke, 2 if smoke else args.steps, ceiling)
    if args.command in ("report", "smoke"):
        print(report(args.out))


if __name__ == "__main__":
    main()
