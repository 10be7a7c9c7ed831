"""MegaDetector pre- and post-processing as SpeciesNet applies it: letterbox, NMS, box scaling.

Written from the published algorithm (YOLOv5 letterbox and class-aware greedy NMS); the YOLOv5 and
ultralytics code is GPL/AGPL and is not copied here. Pure numpy plus cv2.resize, the resize SpeciesNet's
letterbox itself calls, so the detector sees bit-identical pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import cv2
import numpy as np

__all__ = [
    "CATEGORY_LABELS",
    "DetectorConfig",
    "Letterboxed",
    "letterbox",
    "normalised_bbox",
    "nms",
    "postprocess",
]

CATEGORY_LABELS = {"1": "animal", "2": "human", "3": "vehicle"}
_CLASS_OFFSET = 7680.0  # pixels between classes so one NMS pass never mixes them (class-aware)
_MAX_CANDIDATES = 30000


@dataclass(frozen=True)
class DetectorConfig:
    """MegaDetector settings SpeciesNet uses, recorded in the bundle manifest; the defaults are MDv5a's."""

    image_size: int = 1280
    stride: int = 64
    pad_value: int = 114
    conf_threshold: float = 0.01
    iou_threshold: float = 0.45
    max_detections: int = 300
    model: str = "MDv5a"
    typical_threshold: float = 0.2
    conservative_threshold: Optional[float] = 0.05

    @classmethod
    def from_manifest(cls, entry: dict) -> DetectorConfig:
        """The detector's manifest entry (`preprocessing`, `megadetector`); MDv5a's values where it has none."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in (entry.get("preprocessing") or {}).items() if k in known}
        facts = entry.get("megadetector") or {}
        for key, field_name in (("name", "model"), ("typical_detection_threshold", "typical_threshold"),
                                ("conservative_detection_threshold", "conservative_threshold")):
            if key in facts:
                values[field_name] = facts[key]
        config = cls(**values)
        if config.stride <= 0 or config.image_size <= 0 or config.image_size % config.stride:
            raise ValueError(f"detector image_size {config.image_size} is not a positive multiple of its stride "
                             f"{config.stride}")
        if not 0.0 < config.typical_threshold < 1.0:
            raise ValueError(f"detector typical_detection_threshold {config.typical_threshold} is not in (0, 1)")
        return config


@dataclass(frozen=True)
class Letterboxed:
    """A letterboxed image (HWC uint8) and the geometry needed to map boxes back."""

    pixels: np.ndarray
    orig_height: int
    orig_width: int

    @property
    def shape(self) -> tuple[int, int]:
        """Padded (height, width) the network sees."""
        return self.pixels.shape[0], self.pixels.shape[1]


def letterbox(image: np.ndarray, config: DetectorConfig = DetectorConfig()) -> Letterboxed:
    """Scales the long side to `image_size` and pads the short side to a stride multiple."""
    height, width = image.shape[:2]
    ratio = min(config.image_size / height, config.image_size / width)
    new_w, new_h = int(round(width * ratio)), int(round(height * ratio))
    pad_w = (config.image_size - new_w) % config.stride / 2
    pad_h = (config.image_size - new_h) % config.stride / 2
    if (width, height) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(pad_h - 0.1)), int(round(pad_h + 0.1))
    left, right = int(round(pad_w - 0.1)), int(round(pad_w + 0.1))
    padded = cv2.copyMakeBorder(
        image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(config.pad_value,) * 3
    )
    return Letterboxed(padded, height, width)


def to_network_input(images: list[Letterboxed]) -> np.ndarray:
    """Stacks same-shaped letterboxed images into NCHW float32 in [0, 1]."""
    batch = np.stack([im.pixels for im in images]).transpose(0, 3, 1, 2)
    return (batch / 255.0).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: keeps boxes (xyxy) in score order, dropping any with IoU above the threshold."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def normalised_bbox(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> list[float]:
    """Pixel corners to SpeciesNet's [xmin, ymin, w, h]: float32 centre and size, then float64, as SpeciesNet."""
    xc = np.float32((x1 + x2) / 2) / np.float32(width)
    yc = np.float32((y1 + y2) / 2) / np.float32(height)
    w = np.float32(x2 - x1) / np.float32(width)
    h = np.float32(y2 - y1) / np.float32(height)
    return [float(xc) - float(w) / 2.0, float(yc) - float(h) / 2.0, float(w), float(h)]


def postprocess(
    prediction: np.ndarray,
    network_shape: tuple[int, int],
    image: Letterboxed,
    config: DetectorConfig = DetectorConfig(),
) -> list[dict]:
    """Turns one image's raw rows (cx, cy, w, h, obj, classes...) into SpeciesNet detections."""
    rows = prediction[prediction[:, 4] > config.conf_threshold]
    if not len(rows):
        return []
    class_scores = rows[:, 5:] * rows[:, 4:5]
    classes = class_scores.argmax(axis=1)
    conf = class_scores[np.arange(len(rows)), classes]
    half_w, half_h = rows[:, 2] / 2, rows[:, 3] / 2
    boxes = np.stack(
        [rows[:, 0] - half_w, rows[:, 1] - half_h, rows[:, 0] + half_w, rows[:, 1] + half_h], axis=1
    )
    keep = conf > config.conf_threshold
    boxes, conf, classes = boxes[keep], conf[keep], classes[keep]
    order = np.argsort(-conf, kind="stable")[:_MAX_CANDIDATES]
    boxes, conf, classes = boxes[order], conf[order], classes[order]
    kept = nms(boxes + classes[:, None] * np.float32(_CLASS_OFFSET), conf, config.iou_threshold)
    kept = kept[: config.max_detections]
    boxes, conf, classes = boxes[kept], conf[kept], classes[kept]

    net_h, net_w = network_shape
    gain = min(net_h / image.orig_height, net_w / image.orig_width)
    pad_x = (net_w - image.orig_width * gain) / 2
    pad_y = (net_h - image.orig_height * gain) / 2
    boxes = boxes - np.array([pad_x, pad_y, pad_x, pad_y], dtype=np.float32)
    boxes = boxes / np.float32(gain)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image.orig_width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image.orig_height)
    boxes = np.round(boxes)

    detections = []
    for (x1, y1, x2, y2), score, cls in zip(boxes.tolist(), conf.tolist(), classes.tolist()):
        category = str(int(cls) + 1)
        if category not in CATEGORY_LABELS:
            continue
        detections.append(
            {
                "category": category,
                "label": CATEGORY_LABELS[category],
                "conf": score,
                "bbox": normalised_bbox(x1, y1, x2, y2, image.orig_width, image.orig_height),
            }
        )
    detections.sort(key=lambda d: d["conf"], reverse=True)
    return detections
