"""MegaDetector batch output 1.6 (for Timelapse and AddaxAI), each classified box with its final label."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_write_text
from .deployment import parse_time
from .speciesnet_json import ImageInfo, dump_lines, image_failed, limit_float_precision, model_versions, pair_images
from .taxa import RELABELLING_STAGES, WHOLE_IMAGE, common_name, final, reclassified
from .video import video_detections, video_fields

__all__ = ["MEGADETECTOR_DETECTION_CATEGORIES", "MEGADETECTOR_FORMAT_VERSION", "write_megadetector_json"]

MEGADETECTOR_FORMAT_VERSION = "1.6"
MEGADETECTOR_DETECTION_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
_MDV5A = {"name": "MDv5a", "version": "v5a.0.0", "typical_detection_threshold": 0.2,
          "conservative_detection_threshold": 0.05}  # SpeciesNet's detector, for bundles that record none


def _detector(info: dict) -> tuple[str, dict]:
    """The detector's name for `info.detector` and MegaDetector's `detector_metadata`, from the run's record."""
    facts = {**_MDV5A, **((info.get("trapedge") or {}).get("detector") or {})}
    metadata = {"megadetector_version": facts["version"],
                "typical_detection_threshold": facts["typical_detection_threshold"]}
    if facts.get("conservative_detection_threshold") is not None:
        metadata["conservative_detection_threshold"] = facts["conservative_detection_threshold"]
    return f"md_{facts['version']}", metadata


def write_megadetector_json(path: Path, predictions: list[dict], images: dict[str, ImageInfo], *,
                            info: dict) -> None:
    """Writes MegaDetector batch output 1.6: dump-relative files, each classified box with its final label."""
    label_ids: dict[str, str] = {}
    out_images = []
    counts = {stage: 0 for stage in RELABELLING_STAGES}
    for pred, image in pair_images(predictions, images):
        entry: dict[str, Any] = {"file": image.key, **video_fields(pred)}
        if image_failed(pred, image):
            entry["failure"] = "image access failure"
            entry["detections"] = None
        else:
            entry["detections"] = []
            for det in video_detections(pred):
                if str(det.get("category")) == WHOLE_IMAGE:
                    continue
                out = {"category": str(det["category"]), "conf": float(det["conf"]),
                       "bbox": [float(v) for v in det["bbox"]]}
                if det.get("processed_classification") or reclassified(det):
                    decision = final(det)
                    out["classifications"] = [[label_ids.setdefault(decision.label, str(len(label_ids))),
                                               decision.probability]]
                    if decision.stage in counts:
                        counts[decision.stage] += 1
                if det.get("reclassification"):
                    out["reclassification"] = det["reclassification"]
                if "frame_number" in det:
                    out["frame_number"] = det["frame_number"]
                entry["detections"].append(out)
        if image.width and image.height:
            entry["width"], entry["height"] = image.width, image.height
        if image.captured:
            entry["datetime"] = parse_time(image.captured, "captured").strftime("%Y:%m:%d %H:%M:%S")
        out_images.append(entry)
    version = model_versions(predictions)
    relabelled = sum(counts.values())
    classifier = f"SpeciesNet {version}"
    if relabelled:
        classifier += f" + trapedge {__version__} re-classification"
    detector, metadata = _detector(info)
    document = {
        "info": {"detector": f"{detector} (SpeciesNet {version} detector, trapedge {__version__} ONNX)",
                 "detector_metadata": metadata, "classifier": classifier,
                 "classifier_metadata": {"speciesnet_model_version": version, "trapedge_version": __version__,
                                         "reclassified_detections": relabelled,
                                         "reclassified_by_stage": counts},
                 **info, "format_version": MEGADETECTOR_FORMAT_VERSION},
        "detection_categories": dict(MEGADETECTOR_DETECTION_CATEGORIES),
        "classification_categories": {i: common_name(label) for label, i in label_ids.items()},
        "classification_category_descriptions": {i: label for label, i in label_ids.items()},
        "images": out_images,
    }
    atomic_write_text(path, dump_lines(limit_float_precision(document), "images") + "\n")
