"""The published MegaDetector models trapedge exports (MDv5a, MDv1000 redwood and spruce) and their manifest facts.

Documentation only: nothing is downloaded. Names, URLs, architectures, input sizes and GFLOPs are the MDv1000 release
notes' table (agentmorris/MegaDetector, docs/release-notes/mdv1000-release.md, July 2025).

Thresholds, "typical" as MegaDetector's output files call the default one:
- MDv5a 0.2 (typical) and 0.05 (conservative): `known_models['v5a.0.1']` in the megadetector package's
  `megadetector/detection/run_detector.py`.
- MDv1000 0.3: the same table gives redwood `typical_detection_threshold` 0.3 and spruce none; the release notes
  ("Confidence value considerations when comparing to MDv5") say a good default for the new models "is probably
  more like 0.3 or even 0.4" rather than MDv5's 0.2. No conservative threshold is published for MDv1000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["MEGADETECTORS", "MegaDetector", "THRESHOLD_SOURCE", "megadetector"]

_RELEASES = "https://github.com/agentmorris/MegaDetector/releases/download"
THRESHOLD_SOURCE = {
    "mdv5a": "megadetector package, detection/run_detector.py known_models['v5a.0.1']",
    "mdv1000": "megadetector package, detection/run_detector.py known_models['v1000.0.0-redwood'] (0.3); "
               "MDv1000 release notes: 'probably more like 0.3 or even 0.4' for the new models",
}


@dataclass(frozen=True)
class MegaDetector:
    """One published MegaDetector checkpoint: where it lives and how it runs."""

    key: str
    name: str
    version: str
    file: str
    url: str
    architecture: str
    yolo_config: str
    image_size: int
    stride: int
    gflops: float
    typical_threshold: float
    conservative_threshold: Optional[float]
    threshold_source: str
    recommended_range: tuple[float, float]

    def manifest(self) -> dict:
        """The detector entry's `megadetector` block (MegaDetector's own key names for the thresholds)."""
        return {"model": self.key, "name": self.name, "version": self.version, "url": self.url,
                "architecture": self.architecture, "image_size": self.image_size, "stride": self.stride,
                "gflops": self.gflops, "typical_detection_threshold": self.typical_threshold,
                "conservative_detection_threshold": self.conservative_threshold,
                "recommended_thresholds": list(self.recommended_range),
                "threshold_source": self.threshold_source}


MEGADETECTORS: dict[str, MegaDetector] = {
    "mdv5a": MegaDetector(
        "mdv5a", "MDv5a", "v5a.0.1", "md_v5a.0.1.pt", f"{_RELEASES}/v5.0/md_v5a.0.1.pt", "YOLOv5x6",
        "models/hub/yolov5x6.yaml", 1280, 64, 209.8, 0.2, 0.05, THRESHOLD_SOURCE["mdv5a"], (0.1, 0.2)),
    "redwood": MegaDetector(
        "redwood", "MDv1000-redwood", "v1000.0.0-redwood", "md_v1000.0.0-redwood.pt",
        f"{_RELEASES}/v1000.0/md_v1000.0.0-redwood.pt", "YOLOv5x6", "models/hub/yolov5x6.yaml", 1280, 64, 209.8,
        0.3, None, THRESHOLD_SOURCE["mdv1000"], (0.3, 0.4)),
    "spruce": MegaDetector(
        "spruce", "MDv1000-spruce", "v1000.0.0-spruce", "md_v1000.0.0-spruce.pt",
        f"{_RELEASES}/v1000.0/md_v1000.0.0-spruce.pt", "YOLOv5s", "models/yolov5s.yaml", 640, 32, 16.5,
        0.3, None, THRESHOLD_SOURCE["mdv1000"], (0.3, 0.4)),
}


def megadetector(key: str) -> MegaDetector:
    """The table entry for `mdv5a`, `redwood` or `spruce`; a one-line error naming the choices otherwise."""
    try:
        return MEGADETECTORS[key.lower()]
    except KeyError:
        raise ValueError(f"unknown MegaDetector {key!r}; expected one of {', '.join(MEGADETECTORS)}") from None
