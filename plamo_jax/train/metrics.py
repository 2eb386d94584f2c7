"""Metric sinks: TensorBoard event files (tensorboardX), a JSONL log, and a progress bar."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import tqdm
from tensorboardX import SummaryWriter


class MetricsWriter:
    """Writes scalars to TensorBoard and `metrics.jsonl`; only process 0 writes."""

    def __init__(self, output_dir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._tensorboard = None
        self._jsonl = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            self._tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        # repr-exact floats so resumed and uninterrupted runs compare bitwise
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()


def flatten_metrics(metrics: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Scalars stay; arrays (per block / per expert statistics) become name/i entries."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        array = np.asarray(value)
        if array.ndim == 0:
            flat[name] = float(array)
        else:
            for index, item in np.ndenumerate(array):
                flat[f"{name}/{'_'.join(map(str, index))}"] = float(item)
    return flat


class Progress:
    """A tqdm bar showing step, loss, tokens/s and the ETA (tqdm's own)."""

    def __init__(self, start_step: int, total_steps: int, enabled: bool = True):
        self._bar = tqdm.tqdm(
            total=total_steps,
            initial=start_step,
            disable=not enabled,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def update(self, steps: int, **postfix: str) -> None:
        self._bar.update(steps)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self._bar.close()
