"""FP8 matmuls: rounding within the format's bound, forward and gradients equal a hand-quantized
reference, sharded == single device, and a model trained in FP8 tracks the same model in fp32."""

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from helpers import initial_host_params, loss_and_grads, mesh_of, random_batch, small_config
from jax.sharding import NamedSharding, PartitionSpec

from plamo_jax.configuration import load_recipe
from plamo_jax.models import fp8 as fp8_module
from plamo_jax.models.decoder import Decoder
from plamo_jax.models.fp8 import fp8_einsum, quantize_dequantize
from plamo_jax.train.trainer import train


def power_of_two_scale(x: np.ndarray, fp8) -> float:
    """The largest power of two that keeps amax(|x|) within the format (computed with frexp, not log2)."""
    # ratio = m * 2**e with m in [0.5, 1)
    _, exponent = np.frexp(float(ml_dtypes.finfo(fp8).max) / np.abs(x).max())
    return 2.0 ** (int(exponent) - 1)


def hand_quantized(x: np.ndarray, fp8) -> np.ndarray:
    """Per-tensor power-of-two scaling, rounded by ml_dtypes (independent of plamo_jax)."""
    scale = power_of_two_scale(x, fp8)
    return (x.astype(np.float64) * scale).astype(np.float32).astype(fp8).astype(np.float64) / scale


@pytest.mark.parametrize("fp8,mantissa_bits", [(jnp.float8_e4m3fn, 3), (jnp.float8_e5m2, 2)])
def test_rounding_error_is_within_half_an_ulp_and_amax_uses_the_top_binade(fp8, mantissa_bits):
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 3
    rounded = np.asarray(quantize_dequantize(jnp.asarray(x), fp8))
    np.testing.assert_allclose(rounded, hand_quantized(x, fp8), rtol=1e-6)
    info = ml_dtypes.finfo(fp8)
    scale = power_of_two_scale(x, fp8)
    assert float(info.max) / 2 < np.abs(x).max() * scale <= float(info.max)  # at most one binade unused
    smallest_normal = float(info.smallest_normal) / scale
    normal = np.abs(x) >= smallest_normal
    relative = np.abs(rounded - x)[normal] / np.abs(x)[normal]
    assert relative.max() <= 2.0 ** -(mantissa_bits + 1) * (1 + 1e-6)
    assert relative.max() > 2.0 ** -(mantissa_bits + 3)  # and it really rounds


def test_fp8_einsum_forward_and_gradients_equal_the_hand_quantized_matmuls():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32) * 0.1
    upstream = rng.standard_normal((2, 5, 8)).astype(np.float32)

    out, vjp = jax.vjp(lambda a, b: fp8_einsum("bld,df->blf", a, b, jnp.float32), x, w)
    grad_x, grad_w = vjp(jnp.asarray(upstream))

    xq, wq = hand_quantized(x, ml_dtypes.float8_e4m3fn), hand_quantized(w, ml_dtypes.float8_e4m3fn)
    gq = hand_quantized(upstream, ml_dtypes.float8_e5m2)
    np.testing.assert_allclose(out, xq @ wq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_x, gq @ wq.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_w, np.einsum("bld,blf->df", xq, gq), rtol=1e-5, atol=1e-6)
    # ... and the quantization is real: the plain matmul differs.
    assert np.abs(np.asarray(out) - x @ w).max() > 1e-3


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, list[str]]]:
    """name -> (result type, opcode, operand names) of an HLO module's text."""
    found = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?([\w.\-]+) = (\S+) (\w[\w\-]*)\(([^)]*)\)", line)
        if match:
            name, result_type, opcode, operands = match.groups()
            found[name] = (result_type, opcode, [o.strip() for o in operands.split(",") if o.strip()])
    return found


def fp8_operand(instructions, name: str) -> bool:
    """Whether a dot operand is what XLA's GPU rewriter folds into an FP8 GEMM
    (xla/service/gpu/transforms/gemm_rewriter.cc: MatchFp8Param): convert(fp8) times or over a broadcast
    scalar, then only layout ops. A convert after the scaling, say, keeps the GEMM in bf16."""
    layout_ops = {"reshape", "transpose", "bitcast", "copy", "broadcast", "slice", "pad"}
    result_type, opcode, operands = instructions[name]
    while opcode in layout_ops:
        result_type, opcode, operands = instructions[operands[0]]
    if opcode not in ("multiply", "divide"):
        return False
    kinds = [instructions[o] for o in operands]
    converts = [o for o in kinds if o[1] == "convert" and instructions[o[2][0]][0].startswith("f8")]
    is_scalar = lambda operand: instructions[operand][0].split("[")[1].startswith("]")
    scalars = [o for o in kinds if o[1] == "broadcast" and is_scalar(o[2][0])]
    return len(converts) == 1 and len(scalars) == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_every_fp8_dot_of_forward_and_backward_has_the_operand_pattern_xla_rewrites(dtype):
    x = jnp.ones((2, 8, 16), dtype)
    w = jnp.ones((16, 4, 8), dtype)

    def loss(x, w):
        out = fp8_einsum("bld,dhk->blhk", x, w, dtype)
        return jnp.sum(out.astype(jnp.float32) ** 2)  # the forward product feeds the gradient

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text(dialect="hlo")
    instructions = hlo_instructions(hlo)
    dots = [name for name, (_, opcode, _) in instructions.items() if opcode == "dot"]
    assert len(dots) == 3  # forward, input gradient, weight gradient
    for name in dots:
        _, _, operands = instructions[name]
        assert all(fp8_operand(instructions, operand) for operand in operands), (name, hlo)
    # ... and the check can fail: the previous pattern (dequantize in fp32, then convert) does not pass.
    f32_then_convert = lambda q: (q.astype(jnp.float32) * jnp.float32(0.5)).astype(jnp.bfloat16)
    hlo = jax.jit(lambda q, r: jnp.einsum("ij,jk->ik", f32_then_convert(q), f32_then_convert(r))).lower(
        jnp.ones((16, 16), jnp.float8_e4m3fn), jnp.ones((16, 16), jnp.float8_e4m3fn)).as_text(dialect="hlo")
    instructions = hlo_instructions(hlo)
    (dot,) = [name for name, (_, opcode, _) in instructions.items() if opcode == "dot"]
    assert not any(fp8_operand(instructions, operand) for operand in instructions[dot][2])


@pytest.mark.parametrize("x_spec,w_spec", [(("data", None, None), (None, None)),
                                           ((None, None, "tensor"), ("tensor", None)),
                                           (("data", None, None), ("fsdp", "tensor"))],
                         ids=["batch", "contracting", "batch+weight"])
def test_sharded_operands_use_the_scale_of_the_whole_tensor(x_spec, w_spec):
    """Per-tensor amax is a global reduction: a sharded FP8 matmul and its gradients equal the unsharded."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 16, 32)).astype(np.float32)
    w = rng.standard_normal((32, 24)).astype(np.float32)
    upstream = rng.standard_normal((8, 16, 24)).astype(np.float32)

    def objective(x, w, upstream):
        return jnp.sum(fp8_einsum("bld,df->blf", x, w, jnp.float32) * upstream)

    expected = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))(x, w, upstream)
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    put = lambda value, spec: jax.device_put(value, NamedSharding(mesh, PartitionSpec(*spec)))
    sharded = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))(
        put(x, x_spec), put(w, w_spec), put(upstream, x_spec[:2] + (None,))
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), sharded, expected)


def relative_distance(a, b) -> float:
    """Largest per-parameter relative L2 distance between two gradient trees."""
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_fp8_model_sharded_equals_single_device_within_fp8_rounding():
    """The sharded forward is the same to fp32 precision. Gradients differ only where fp32 reduction order
    tips an FP8 rounding (an E5M2 step is 25%), far less than FP8 itself moves them from fp32."""
    config = small_config(fp8=True, num_layers=1)
    mesh = mesh_of(data=1)
    host_params = initial_host_params(config)
    host_batch = random_batch(np.random.default_rng(0), 8, 16, config.model.vocab_size)
    loss, grads = loss_and_grads(config, mesh, host_params, host_batch)

    sharded = small_config(fp8=True, num_layers=1)
    sharded.mesh.update(data=2, fsdp=2, tensor=2)
    loss_8, grads_8 = loss_and_grads(sharded, mesh_of(data=2, fsdp=2, tensor=2), host_params, host_batch)
    loss_fp32, grads_fp32 = loss_and_grads(small_config(num_layers=1), mesh, host_params, host_batch)

    np.testing.assert_allclose(loss_8, loss, rtol=1e-5)
    assert loss != loss_fp32 and abs(loss - loss_fp32) < 0.01 * loss_fp32
    fp8_effect = relative_distance(grads, grads_fp32)
    assert 0.01 < fp8_effect < 0.3
    assert relative_distance(grads_8, grads) < 0.25 * fp8_effect


EXPECTED_PROJECTIONS = {
    "dense": {"bld,dhk->blhk": 3, "blhk,hkd->bld": 1, "bld,df->blf": 2, "blf,fd->bld": 1},
    # a Mamba layer and an attention layer, each with its MLP
    "hybrid": {"bld,dhk->blhk": 3, "blhk,hkd->bld": 1, "bld,df->blf": 4, "blf,fd->bld": 2,
               "bld,dhkp->blhkp": 1, "blhp,hpd->bld": 1},
}


@pytest.mark.parametrize("family", ["dense", "hybrid"])
def test_fp8_covers_every_weight_projection_and_nothing_else(family, monkeypatch):
    """Traced FP8 matmuls: q/k/v/o, gate/up/down (and Mamba in/out); none with fp8 off."""
    model_cfg = (small_config() if family == "dense" else load_recipe("plamo2_tiny")).model
    calls = []
    real = fp8_module.fp8_einsum
    monkeypatch.setattr(fp8_module, "fp8_einsum", lambda spec, *a: calls.append(spec) or real(spec, *a))
    tokens = np.random.default_rng(2).integers(3, model_cfg.vocab_size, (1, 12)).astype(np.int32)
    ones, positions = np.ones_like(tokens), np.arange(12)[None]
    model = Decoder(model_cfg, rngs=nnx.Rngs(0))
    reference, _ = model(tokens, ones, positions)
    assert calls == []
    fp8_cfg = model_cfg.copy_and_resolve_references()
    fp8_cfg.fp8 = True
    fp8_model = Decoder(fp8_cfg, rngs=nnx.Rngs(1))
    nnx.update(fp8_model, nnx.state(model))
    logits, _ = fp8_model(tokens, ones, positions)
    assert {spec: calls.count(spec) for spec in set(calls)} == {  # one trace of each scanned layer kind
        spec: count for spec, count in EXPECTED_PROJECTIONS[family].items()
    }
    distance = np.linalg.norm(np.asarray(logits) - reference) / np.linalg.norm(reference)
    assert 1e-4 < distance < 0.3


@pytest.mark.slow  # minutes of training; the default suite keeps the faster checks of the same code
def test_training_in_fp8_tracks_fp32(tmp_path):
    """The tiny recipe for 120 steps with and without FP8 on the same batches: the last 20 steps' mean
    losses within 8% (300 steps measured here: 1.584 vs 1.517 nats, 4.4%)."""
    finals = []
    for fp8 in (False, True):
        config = load_recipe("tiny")
        config.model.fp8 = fp8
        config.train.steps = 120
        config.train.log_every = 1
        config.train.output_dir = str(tmp_path / f"fp8_{fp8}")
        config.checkpoint.enabled = False
        train(config)
        metrics = [json.loads(line) for line in open(tmp_path / f"fp8_{fp8}" / "metrics.jsonl")]
        finals.append(np.mean([m["cross_entropy"] for m in metrics[-20:]]))
    fp32, fp8 = finals
    assert fp8 != fp32 and abs(fp8 - fp32) < 0.08 * fp32, finals
