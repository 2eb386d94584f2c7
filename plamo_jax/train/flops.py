"""Model FLOPs per training token: 3 x the family's forward count (peak FLOP/s: train/peak_flops.py)."""

from __future__ import annotations

import ml_collections

from plamo_jax.models import registry


def train_flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int, factor: float = 1.0) -> float:
    """Forward + backward (2 x forward) model FLOPs from the family's count, times an objective's factor.

    Rematerialisation is not counted (MFU, not HFU).
    """
    return 3 * registry.get_family(model_cfg).forward_flops_per_token(model_cfg, seq_len) * factor
