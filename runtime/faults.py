"""Fault injection for crash tests: TRAPEDGE_KILL_AT=point:n kills the process at the n-th pass of a point."""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["checkpoint"]

_TARGET = os.environ.get("TRAPEDGE_KILL_AT", "")
_POINT, _, _NTH = _TARGET.partition(":")
_SEEN: Counter = Counter()


def checkpoint(point: str) -> None:
    """SIGKILLs this process at the configured point (a no-op unless TRAPEDGE_KILL_AT names it)."""
    if point != _POINT:
        return
    _SEEN[point] += 1
    if _SEEN[point] >= int(_NTH or 1):
        os.kill(os.getpid(), signal.SIGKILL)
