"""Goodput: where a run's wall time goes.

Productive time is what is left of the wall time after compiling, blocking on checkpoint writes,
waiting for data, building or restoring the initial state, and the steps thrown away by a rewind
(with its restore) or by a restart (the steps a crashed attempt ran after its last checkpoint).
Logged per interval and summarised at exit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

CATEGORIES = ("compile", "checkpoint", "data", "initial_state", "rewound", "restart_lost")


class Goodput:
    def __init__(self):
        self.started = time.perf_counter()
        self.totals = dict.fromkeys(CATEGORIES, 0.0)
        self._interval_start = self.started
        self._interval_totals = dict(self.totals)

    @contextlib.contextmanager
    def timing(self, category: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(category, time.perf_counter() - start)

    def add(self, category: str, seconds: float) -> None:
        self.totals[category] += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def productive(self, elapsed: float, totals: dict[str, float]) -> float:
        # restart_lost happened in an earlier process: it is lost, but not part of this wall time
        return max(elapsed - sum(v for k, v in totals.items() if k != "restart_lost"), 0.0)

    def interval_metrics(self) -> dict[str, float]:
        """goodput/* seconds spent since the previous call, and the productive share of them."""
        now = time.perf_counter()
        elapsed = now - self._interval_start
        spent = {name: self.totals[name] - self._interval_totals[name] for name in CATEGORIES}
        productive = self.productive(elapsed, spent)
        self._interval_start, self._interval_totals = now, dict(self.totals)
        metrics = {f"goodput/{name}_seconds": seconds for name, seconds in spent.items()}
        metrics["goodput/productive_seconds"] = productive
        metrics["goodput/productive_fraction"] = productive / max(elapsed + spent["restart_lost"], 1e-9)
        return metrics

    def summary(self) -> str:
        elapsed = self.elapsed()
        productive = self.productive(elapsed, self.totals)
        wall = elapsed + self.totals["restart_lost"]
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.totals.items() if seconds > 0)
        return (f"goodput {productive / max(wall, 1e-9):.1%}: productive {productive:.1f} s of {wall:.1f} s"
                + (f" ({parts})" if parts else ""))
