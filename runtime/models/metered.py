"""A backend wrapper that records each call's input shapes and wall time, so `trapedge bench` can report GFLOP/s."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Optional

import numpy as np

__all__ = ["Metered"]


class Metered:
    """Any backend (`run(inputs, outputs)`), with calls counted by input shapes and their seconds summed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[tuple[tuple[str, tuple[int, ...]], ...]] = Counter()
        self.seconds = 0.0

    def run(self, inputs: dict[str, np.ndarray], outputs: Optional[list[str]] = None) -> list[np.ndarray]:
        """Runs the wrapped backend and records the call."""
        started = time.perf_counter()
        result = self.inner.run(inputs, outputs)
        self.seconds += time.perf_counter() - started
        self.calls[tuple(sorted((name, tuple(a.shape)) for name, a in inputs.items()))] += 1
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
