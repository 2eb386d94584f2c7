"""Metric sinks: TensorBoard event files (tensorboardX), a JSONL log, and a progress bar."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import tqdm
from tensorboardX import SummaryWriter


class MetricsWriter:
    """Writes scalars to TensorBoard and `metrics.jsonl`; only process 0 writes.

    A run that resumes (or rewinds) to step s re-runs the steps after s: their old lines move to
    `metrics.superseded.jsonl` and TensorBoard purges their events, so each step appears once.
    """

    def __init__(self, output_dir: str, *, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.output_dir = output_dir
        self.superseded: list[dict] = []  # the records an earlier attempt wrote after start_step
        self._tensorboard = None
        self._jsonl = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            self._open(start_step)

    @property
    def jsonl_path(self) -> str:
        return os.path.join(self.output_dir, "metrics.jsonl")

    def _open(self, start_step: int) -> None:
        self.superseded = supersede_after(self.jsonl_path, start_step)
        # purge_step: TensorBoard drops the events of steps >= it written by an earlier attempt
        self._tensorboard = SummaryWriter(os.path.join(self.output_dir, "tensorboard"),
                                          purge_step=start_step + 1 if start_step else None)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def restart_at(self, step: int) -> None:
        """Continue from `step` again (a rewind): what was written after it is superseded."""
        if self.enabled:
            self.close()
            self._open(step)

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


def supersede_after(path: str, step: int) -> list[dict]:
    """Move the lines of `path` for steps after `step` to <name>.superseded.jsonl; returns their records."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept, moved, records = [], [], []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash: keep it where it is
            record = {}
        later = record.get("step", 0) > step
        (moved if later else kept).append(line)
        if later:
            records.append(record)
    if moved:
        with open(path.removesuffix(".jsonl") + ".superseded.jsonl", "a", encoding="utf-8") as f:
            f.writelines(moved)
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(temporary, path)
    return records


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

    def reset(self, step: int) -> None:
        """Show `step` again (after a rewind)."""
        self._bar.n = step
        self._bar.refresh()

    def update(self, steps: int, **postfix: str) -> None:
        self._bar.update(steps)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self._bar.close()
