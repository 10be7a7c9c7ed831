"""SpeciesNet crop preprocessing, bit-exact with torchvision's, and logits to top-k.

torchvision cannot be a runtime dependency, and no small library reproduces its bilinear resize
without antialiasing (half-pixel centres, float32, edge clamping), so it is written out here.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = [
    "CROP_SIZE",
    "crop_box",
    "crop_region",
    "preprocess_crop",
    "resize_bilinear",
    "select_for_classification",
    "softmax",
    "top_k",
]

CROP_SIZE = 480
_UINT8_SCALE = np.float32(255.0 + 1.0 - 1e-3)  # torchvision's float -> uint8 conversion factor


def crop_box(height: int, width: int, bbox: Sequence[float]) -> tuple[int, int, int, int]:
    """Integer crop (top, left, crop_height, crop_width) SpeciesNet takes for a normalised box."""
    xmin, ymin, box_w, box_h = bbox
    return int(ymin * height), int(xmin * width), int(box_h * height), int(box_w * width)


def crop_region(image: np.ndarray, bbox: Sequence[float]) -> Optional[np.ndarray]:
    """SpeciesNet's integer crop of a box (zero-padded past the image edge, as torchvision crops); None if empty."""
    height, width = image.shape[:2]
    top, left, crop_h, crop_w = crop_box(height, width, bbox)
    if crop_h <= 0 or crop_w <= 0:
        return None
    region = np.zeros((crop_h, crop_w, 3), dtype=np.uint8)
    src = image[max(top, 0) : top + crop_h, max(left, 0) : left + crop_w]
    region[max(-top, 0) : max(-top, 0) + src.shape[0], max(-left, 0) : max(-left, 0) + src.shape[1]] = src
    return region


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, lam1


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize to float32, no antialias, as torch's upsample_bilinear2d on `image / 255` (uint8 HWC in).

    Pixels are gathered as uint8 and scaled after, so only the 4 x out_h x out_w samples are converted; the
    arithmetic runs in place (the same operations in the same order, so the same bits, with fewer temporaries).
    """
    y0, y1, ly1 = _axis_weights(image.shape[0], out_h)
    x0, x1, lx1 = _axis_weights(image.shape[1], out_w)
    ly0, lx0 = np.float32(1) - ly1, np.float32(1) - lx1
    lx0, lx1 = lx0[None, :, None], lx1[None, :, None]
    rows0, rows1 = image[y0], image[y1]

    def weighted(rows: np.ndarray, columns: np.ndarray, weight: np.ndarray) -> np.ndarray:
        sample = rows[:, columns].astype(np.float32)
        sample /= np.float32(255)
        sample *= weight
        return sample

    top = weighted(rows0, x0, lx0)
    top += weighted(rows0, x1, lx1)
    bottom = weighted(rows1, x0, lx0)
    bottom += weighted(rows1, x1, lx1)
    top *= ly0[:, None, None]
    bottom *= ly1[:, None, None]
    top += bottom
    return top


def preprocess_crop(image: np.ndarray, bbox: Sequence[float]) -> Optional[np.ndarray]:
    """Crops a box from a full-resolution RGB image and makes SpeciesNet's 480x480 uint8 HWC crop.

    Returns None when the integer crop is empty (a box thinner than a pixel), where SpeciesNet 5.0.6
    raises and loses the batch.
    """
    region = crop_region(image, bbox)
    if region is None:
        return None
    resized = resize_bilinear(region, CROP_SIZE, CROP_SIZE)
    resized *= _UINT8_SCALE
    return resized.astype(np.uint8)


def to_network_input(crops: list[np.ndarray]) -> np.ndarray:
    """Stacks uint8 crops into NHWC float32 in [0, 1], as SpeciesNet feeds its classifier."""
    return np.stack([c / 255.0 for c in crops]).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k highest scores per row, highest first."""
    k = min(k, scores.shape[-1])
    part = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx = np.take_along_axis(part, order, axis=-1)
    return idx, np.take_along_axis(scores, idx, axis=-1)


def select_for_classification(detections: Sequence[dict], threshold: float,
                              most: Optional[int] = None) -> list[int]:
    """Indices of the detections SpeciesNet classifies: confidence >= threshold, the `most` most confident when
    capped (None or negative: no cap), in increasing order (its `--max_classifications_per_image`)."""
    chosen = [i for i, det in enumerate(detections) if det["conf"] >= threshold]
    if most is not None and most >= 0:
        chosen = sorted(sorted(chosen, key=lambda i: detections[i]["conf"], reverse=True)[:most])
    return chosen
