"""Model FLOPs per training token (3 x the family's forward count) and peak device FLOP/s for MFU."""

from __future__ import annotations

import jax
import ml_collections

from plamo_jax.models import registry

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_FLOPS_BY_DEVICE_KIND = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
}


def peak_flops_per_device(configured: float = 0.0, device: jax.Device | None = None) -> float | None:
    """The configured peak if set, else the table's entry for this device kind (None if unknown)."""
    if configured > 0:
        return configured
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name in sorted(PEAK_FLOPS_BY_DEVICE_KIND, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS_BY_DEVICE_KIND[name]
    return None


def train_flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int, factor: float = 1.0) -> float:
    """Forward + backward (2 x forward) model FLOPs from the family's count, times an objective's factor.

    Rematerialisation is not counted (MFU, not HFU).
    """
    return 3 * registry.get_family(model_cfg).forward_flops_per_token(model_cfg, seq_len) * factor
