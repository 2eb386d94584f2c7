"""The peak FLOP/s that MFU divides by: configured, the vendor's figure, or measured on this device.

Vendor figures are dense (no sparsity) and keyed by the compute dtype of the matmuls, since bf16,
fp8 and fp32 peaks differ; fp32 on NVIDIA GPUs is the TF32 tensor-core figure (XLA's default
precision for fp32 dots there), on TPUs the bf16 one (one bf16 pass by default). Where the table
has no figure (CPUs, unknown accelerators) the peak is measured once: the best of a few timed square
matmuls in the compute dtype, cached per machine, device kind and dtype. Every result says where it
came from, so the log and TensorBoard never show an MFU against an invented number.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path

import jax

log = logging.getLogger(__name__)

# device kind substring -> compute dtype -> FLOP/s per device (vendor datasheets, dense).
VENDOR_PEAKS: dict[str, dict[str, float]] = {
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float8": 1979e12, "float32": 495e12},
    "h200": {"bfloat16": 989e12, "float16": 989e12, "float8": 1979e12, "float32": 495e12},
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "tpu v4": {"bfloat16": 275e12, "float32": 275e12},
    "tpu v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e reports itself as "TPU v5 lite"
    "tpu v5e": {"bfloat16": 197e12, "float32": 197e12},
    "tpu v5p": {"bfloat16": 459e12, "float32": 459e12},
    "tpu v5": {"bfloat16": 459e12, "float32": 459e12},
    "tpu v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
    "tpu v6e": {"bfloat16": 918e12, "float32": 918e12},
}
CALIBRATION_SIZES = {"cpu": 2048}  # accelerators: 8192
CALIBRATION_REPEATS = 5


@dataclasses.dataclass(frozen=True)
class Peak:
    flops_per_device: float
    source: str  # "configured", "vendor" or "measured"
    how: str  # for the log: which table entry or which measurement

    def describe(self) -> str:
        return f"{self.flops_per_device:.3g} FLOP/s per device ({self.source}: {self.how})"


def compute_dtype_name(model_cfg) -> str:
    """The dtype of the model's matmuls: float8 with model.fp8, else model.dtype."""
    return "float8" if model_cfg.fp8 else str(model_cfg.dtype)


def vendor_peak(device_kind: str, dtype: str) -> float | None:
    kind = device_kind.lower()
    for name in sorted(VENDOR_PEAKS, key=len, reverse=True):
        if name in kind:
            return VENDOR_PEAKS[name].get(dtype)
    return None


def measure_matmul_flops(dtype: str, device: jax.Device | None = None, size: int | None = None) -> float:
    """Best FLOP/s of `CALIBRATION_REPEATS` timed [size, size] x [size, size] matmuls on `device`."""
    device = device or jax.devices()[0]
    size = size or CALIBRATION_SIZES.get(device.platform, 8192)
    operand_dtype = operand_dtype_name(dtype)
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.device_put(jax.random.normal(k, (size, size), operand_dtype), device) for k in keys)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(CALIBRATION_REPEATS):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def operand_dtype_name(dtype: str) -> str:
    """What a calibration multiplies: FP8 training quantises bf16 operands, so bf16 stands in for fp8."""
    return "bfloat16" if dtype == "float8" else dtype


def cache_path() -> Path:
    root = os.environ.get("PLAMO_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "plamo_jax")
    return Path(root) / "peak_flops.json"


def _cache_key(device: jax.Device, dtype: str) -> str:
    return f"{socket.gethostname()}|{device.platform}|{device.device_kind}|{dtype}"


def measured_peak(dtype: str, device: jax.Device | None = None) -> Peak:
    """The cached measurement for this machine, device kind and dtype, measuring it the first time."""
    device = device or jax.devices()[0]
    key, path = _cache_key(device, dtype), cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        entry = cache[key]
        return Peak(entry["flops"], "measured", f"{entry['how']}, cached in {path}")
    size = CALIBRATION_SIZES.get(device.platform, 8192)
    flops = measure_matmul_flops(dtype, device, size)
    operands = operand_dtype_name(dtype)
    how = f"best of {CALIBRATION_REPEATS} {size}^3 {operands} matmuls on {device.device_kind}"
    cache[key] = {"flops": flops, "how": how}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")
    except OSError as error:  # an unwritable cache only costs a measurement next time
        log.warning("could not cache the measured peak in %s: %s", path, error)
    return Peak(flops, "measured", how)


def peak_flops(configured: float, model_cfg, *, calibrate: bool = True,
               device: jax.Device | None = None) -> Peak | None:
    """train.peak_flops_per_device if set (> 0), else the vendor figure for the device and compute
    dtype, else a measurement (when `calibrate`), else None: then no MFU is shown."""
    if configured > 0:
        return Peak(float(configured), "configured", "train.peak_flops_per_device")
    device = device or jax.devices()[0]
    dtype = compute_dtype_name(model_cfg)
    figure = vendor_peak(device.device_kind, dtype)
    if figure is not None:
        return Peak(figure, "vendor", f"{device.device_kind} {dtype} datasheet figure")
    if not calibrate:
        return None
    return measured_peak(dtype, device)
