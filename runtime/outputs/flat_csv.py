"""The flat results CSV: one row per detection, SpeciesNet's label beside the final one; the shared CSV writer."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable

from ..atomic import atomic_write_text
from .speciesnet_json import DECIMALS, ImageInfo, image_failed, pair_images
from .taxa import common_name, final, level, taxon

__all__ = ["FLAT_COLUMNS", "csv_text", "write_flat_csv"]

FLAT_COLUMNS = [
    "key", "filepath", "captured", "status", "reason", "detection", "category", "detector_label", "conf",
    "bbox_x", "bbox_y", "bbox_width", "bbox_height", "speciesnet_class", "speciesnet_score", "speciesnet_source",
    "final_class", "final_level", "final_stage", "final_probability", "final_method", "common_name",
    "scientific_name",
]


def csv_text(columns: list[str], rows: Iterable[dict]) -> str:
    """CSV text of `rows` under `columns`: None as an empty cell, booleans as true/false, newline line ends."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _rounded(value: Any) -> Any:
    return round(float(value), DECIMALS) if value is not None else None


def write_flat_csv(path: Path, predictions: list[dict], images: dict[str, ImageInfo]) -> None:
    """Writes one row per detection (one per image without any), SpeciesNet's label beside the final one."""
    rows = []
    for pred, image in pair_images(predictions, images):
        base = {"key": image.key, "filepath": image.filepath, "captured": image.captured,
                "status": "failed" if image_failed(pred, image) else image.status,
                "reason": image.reason or pred.get("failure_reason")}
        detections = pred.get("detections") or []
        if not detections:
            rows.append(base)
        for idx, det in enumerate(detections):
            processed = det.get("processed_classification") or {}
            decision = final(det)
            entry = taxon(decision.label)
            x, y, w, h = det.get("bbox") or (None, None, None, None)
            rows.append({**base, "detection": idx, "category": det.get("category"),
                         "detector_label": det.get("label"), "conf": _rounded(det.get("conf")),
                         "bbox_x": _rounded(x), "bbox_y": _rounded(y), "bbox_width": _rounded(w),
                         "bbox_height": _rounded(h), "speciesnet_class": processed.get("class"),
                         "speciesnet_score": _rounded(processed.get("score")),
                         "speciesnet_source": processed.get("source"), "final_class": decision.label,
                         "final_level": level(decision.label), "final_stage": decision.stage,
                         "final_probability": decision.probability, "final_method": decision.method,
                         "common_name": common_name(decision.label),
                         "scientific_name": entry["scientificName"] if entry else None})
    atomic_write_text(path, csv_text(FLAT_COLUMNS, rows))
