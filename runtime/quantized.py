"""Refuses quantised bundle models whose recorded agreement with their base model is below a floor."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from .bundle import BundleError

__all__ = ["check_agreement", "is_quantized"]


def is_quantized(spec_raw: Mapping[str, Any]) -> bool:
    """True for a manifest model entry derived from another model at a lower precision."""
    return bool(spec_raw.get("base_model")) or spec_raw.get("precision", "fp32") != "fp32"


def check_agreement(spec_raw: Mapping[str, Any], floor: Optional[float]) -> None:
    """Raises BundleError when a quantised model's top-1 agreement is below `floor` (or its recorded floor)."""
    if not is_quantized(spec_raw):
        return
    where = spec_raw.get("file", "model")
    label = f"{where}: {spec_raw.get('precision', 'quantised')} model"
    base = spec_raw.get("base_model", "its base model")
    if floor is None:
        floor = spec_raw.get("agreement_floor")
    if floor is not None and not (isinstance(floor, (int, float)) and 0.0 <= floor <= 1.0):
        raise BundleError(f"{label}: agreement floor {floor!r} is not a number in [0, 1]")
    measured = (spec_raw.get("agreement") or {}).get("top1_agreement")
    if not isinstance(measured, (int, float)):
        raise BundleError(f"{label} has no recorded top-1 agreement with {base}; quantise it again")
    if floor is not None and measured < floor:
        count = (spec_raw.get("agreement") or {}).get("count")
        on = f" on {count} inputs" if count else ""
        raise BundleError(f"{label} agrees with {base} on top-1 for {measured:.3f}{on}, below the floor "
                          f"{floor:.3f}; use {base} or lower the floor")
