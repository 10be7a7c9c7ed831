"""Refuses quantised variants a bundle lacks, and those whose recorded agreement with their base model is below a floor.

`trapedge quantize` records, per quantised model, `agreement` (measured against fp32 on held-out photos) and
`agreement_floor` ({metric: floor}). The classifier is gated on `top1_agreement` and `feature_cosine` (the
mean cosine of the pooled `features` output), the detector on `boxes_found` (share of fp32 boxes the
quantised model finds). A bare number as floor (older bundles) gates top-1 agreement only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .backends import BackendError
from .bundle import Bundle, BundleError, ModelSpec

__all__ = ["METRICS", "QUANTIZED", "check_agreement", "check_tensorrt", "floors", "is_quantized", "makes_variant",
           "quantize_command", "require_variant"]

QUANTIZED = {"classifier": ("fp16", "int8"), "detector": ("int8",)}  # what `trapedge quantize` makes

METRICS = {
    "top1_agreement": "top-1 agreement",
    "feature_cosine": "mean feature cosine",
    "boxes_found": "fp32 boxes found",
}


def is_quantized(spec_raw: Mapping[str, Any]) -> bool:
    """True for a manifest model entry derived from another model at a lower precision."""
    return bool(spec_raw.get("base_model")) or spec_raw.get("precision", "fp32") != "fp32"


def _gated(agreement: Mapping[str, Any]) -> tuple[str, ...]:
    if "boxes_found" in agreement:
        return ("boxes_found",)
    if agreement.get("feature_cosine") is not None:
        return ("top1_agreement", "feature_cosine")
    return ("top1_agreement",)


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def floors(spec_raw: Mapping[str, Any], floor: Optional[float] = None) -> dict[str, float]:
    """The floor per gated metric: `floor` (if given) for every metric the model is gated on, else the
    recorded ones. Raises BundleError for a floor that is not a number in [0, 1]."""
    label = f"{spec_raw.get('file', 'model')}: {spec_raw.get('precision', 'quantised')} model"
    agreement = spec_raw.get("agreement") or {}
    recorded = spec_raw.get("agreement_floor")
    if isinstance(recorded, Mapping):
        chosen = dict(recorded)
    elif recorded is None:
        chosen = {}
    else:
        chosen = {metric: recorded for metric in _gated(agreement)}
    if floor is not None:
        chosen = {metric: floor for metric in (chosen or _gated(agreement))}
    for metric, value in chosen.items():
        if metric not in METRICS:
            raise BundleError(f"{label}: unknown agreement metric {metric!r} in its floor")
        if not _is_fraction(value):
            raise BundleError(f"{label}: agreement floor {value!r} is not a number in [0, 1]")
    return chosen


def _figure(value: float) -> str:
    """Four decimals, truncated, so a figure below its floor never prints as equal to it."""
    return f"{math.floor(value * 1e4) / 1e4:.4f}"


def check_agreement(spec_raw: Mapping[str, Any], floor: Optional[float]) -> None:
    """Raises BundleError (one line: measured figures and floors) when a quantised model's recorded agreement
    is below any floor: `floor` for every gated metric when given, else the floors recorded with it."""
    if not is_quantized(spec_raw):
        return
    label = f"{spec_raw.get('file', 'model')}: {spec_raw.get('precision', 'quantised')} model"
    base = spec_raw.get("base_model", "its base model")
    chosen = floors(spec_raw, floor)
    agreement = spec_raw.get("agreement") or {}
    for metric in chosen or _gated(agreement):
        if metric == "boxes_found" and agreement.get("boxes") == 0:
            raise BundleError(f"{label}: its agreement with {base} was measured on no fp32 boxes (none at conf >= "
                              f"{agreement.get('min_conf')} on {agreement.get('count')} held-out photos); quantise "
                              "it again with more photos (--images)")
        if not _is_fraction(agreement.get(metric)):
            raise BundleError(f"{label} has no recorded {METRICS[metric]} with {base}; quantise it again")
    below = [metric for metric, value in chosen.items() if agreement[metric] < value]
    if not below:
        return
    figures = ", ".join(f"{METRICS[m]} {_figure(agreement[m])} (floor {v:.4f}{', below' if m in below else ''})"
                        for m, v in chosen.items())
    if "boxes_found" in chosen:
        on = (f"{agreement.get('found')}/{agreement.get('boxes')} boxes at conf >= {agreement.get('min_conf')} "
              f"on {agreement.get('count')} held-out photos")
    else:
        on = f"{agreement.get('count')} held-out inputs"
    raise BundleError(f"{label} agreement with {base} is below the floor: {figures}, on {on}; "
                      f"use {base} or lower the floor")


def check_tensorrt(spec_raw: Mapping[str, Any]) -> None:
    """Raises BundleError for a quantised model TensorRT cannot build (uint8 asymmetric activations)."""
    if (spec_raw.get("quantization") or {}).get("tensorrt") is False:
        raise BundleError(f"{spec_raw.get('file', 'model')}: quantised with "
                          f"{spec_raw['quantization'].get('activations', 'asymmetric')} activations, which TensorRT "
                          "refuses; quantise it again with --activations int8 for TensorRT")


def makes_variant(name: str, precision: str) -> bool:
    """True when `trapedge quantize` makes a `{name}_{precision}` variant (fp16: classifier; int8: both)."""
    return precision in QUANTIZED.get(name, ())


def quantize_command(bundle_root: Union[Path, str], precision: str) -> str:
    """The command that adds the bundle's variants at a precision."""
    return f"trapedge quantize --bundle {bundle_root} --precision {precision}"


def require_variant(bundle: Bundle, name: str, precision: str) -> ModelSpec:
    """The bundle's `{name}_{precision}` model, or a one-line BackendError naming the command that makes it."""
    variant = f"{name}_{precision}"
    if bundle.has_model(variant):
        return bundle.model(variant)
    if makes_variant(name, precision):
        raise BackendError(f"{name}: the bundle has no {precision} variant ({variant}); make it with: "
                           f"{quantize_command(bundle.root, precision)}")
    makers = ", ".join(m for m, made in QUANTIZED.items() if precision in made) or "no model"
    raise BackendError(f"{name}: the bundle has no {precision} variant ({variant}) and `trapedge quantize` makes "
                       f"{precision} for {makers} only")
