"""Bar charts for the card report as inline SVG, drawn by matplotlib (the `report` extra), None without it."""

from __future__ import annotations

import io
import re
from typing import Optional, Sequence

__all__ = ["available", "bar_chart"]

_WIDTH_IN, _BAR_IN, _DPI, _MIN_SLOTS = 7.5, 0.24, 96, 12
_COLOUR, _TEXT = "#3b7d4f", "#222222"
_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.S)


def available() -> bool:
    """True when matplotlib can be imported (the report then draws charts; its tables are there either way)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str, horizontal: bool = False,
              value_label: str = "", rotate: bool = False) -> Optional[str]:
    """An SVG element (no XML prologue, text kept as text) of one bar chart, or None without matplotlib or data."""
    if not labels or not available():
        return None
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    settings = {"svg.fonttype": "none", "svg.hashsalt": "trapedge", "text.parse_math": False, "font.size": 9,
                "text.color": _TEXT,
                "axes.edgecolor": "#888888", "axes.labelcolor": _TEXT, "xtick.color": _TEXT, "ytick.color": _TEXT,
                "axes.spines.top": False, "axes.spines.right": False}
    with rc_context(settings):
        height = max(1.6, 0.9 + _BAR_IN * len(labels)) if horizontal else 2.6 + (0.6 if rotate else 0.0)
        figure = Figure(figsize=(_WIDTH_IN, height), dpi=_DPI, layout="constrained")
        axes = figure.add_subplot()
        positions = range(len(labels))
        if horizontal:
            axes.barh(positions, values, color=_COLOUR)
            axes.set_yticks(list(positions), [str(v) for v in labels])
            axes.invert_yaxis()
            axes.set_xlabel(value_label)
            axes.xaxis.get_major_locator().set_params(integer=True)
        else:
            axes.bar(positions, values, color=_COLOUR)
            axes.set_xticks(list(positions), [str(v) for v in labels], rotation=60 if rotate else 0,
                            ha="right" if rotate else "center")
            axes.set_ylabel(value_label)
            axes.yaxis.get_major_locator().set_params(integer=True)
            slack = max(0.0, (_MIN_SLOTS - len(labels)) / 2)
            axes.set_xlim(-0.5 - slack, len(labels) - 0.5 + slack)
        axes.set_title(title, loc="left", fontsize=10)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    return _PROLOGUE.sub("", buffer.getvalue(), count=1).strip()
