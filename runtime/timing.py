"""Per-stage wall-clock timers, cheap enough to stay on in every run."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np

__all__ = ["StageTimer"]


class StageTimer:
    """Collects wall-clock durations per named stage."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the enclosed block under a stage name."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        """Records one duration."""
        self.samples.setdefault(name, []).append(seconds)

    def merge(self, other: StageTimer) -> None:
        """Adds every duration another timer recorded (pass 2 keeps its own while it runs)."""
        for name, values in other.samples.items():
            self.samples.setdefault(name, []).extend(values)

    def summary(self) -> dict[str, dict[str, float]]:
        """Count, mean, p50, p95 and total in milliseconds per stage."""
        out = {}
        for name, values in self.samples.items():
            ms = np.asarray(values) * 1000.0
            out[name] = {
                "count": int(ms.size),
                "mean_ms": float(ms.mean()),
                "p50_ms": float(np.percentile(ms, 50)),
                "p95_ms": float(np.percentile(ms, 95)),
                "total_ms": float(ms.sum()),
            }
        return out
