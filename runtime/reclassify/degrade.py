"""Degraded views of reference crops and crop quality: the held-out evidence pass 2 calibrates on.

On a real card the detections SpeciesNet could not resolve are the hard ones (small, grey night IR, dark,
cut by the box edge). Calibration on clean references would not transfer to them, so pass 1 renders a
bounded sample of each label's references the way the card's hard crops look and embeds those views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["KINDS", "EmbeddedView", "ReferenceSampler", "View", "background_patch", "crop_quality", "render_views"]

KINDS = ("small", "grey", "dark", "cut")
_DEFAULT_SIDES = (10, 64)


@dataclass(frozen=True)
class View:
    """One degraded view: the pixels (HWC uint8), what was done to it, and its simulated box side in pixels."""

    pixels: np.ndarray
    kinds: tuple[str, ...]
    side_px: float


@dataclass(frozen=True)
class EmbeddedView:
    """A degraded view after pass 1 ran it: its source detection, truth label, embedding and top-5."""

    detection: int
    label: str
    kind: str
    vector: np.ndarray
    top: tuple[list[str], list[float]]
    quality: np.ndarray


def crop_quality(crop: np.ndarray, side_px: float) -> np.ndarray:
    """(box side in source pixels, mean brightness 0..1, colourfulness 0..1) of an HWC uint8 crop."""
    rgb = np.asarray(crop, dtype=np.float32)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    rgb = rgb[..., :3] / 255.0
    brightness = float(rgb.mean()) if rgb.size else 0.0
    colour = float(np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()) / 2 \
        if rgb.size else 0.0
    return np.array([float(side_px), brightness, colour], dtype=np.float32)


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize((max(1, size[0]), max(1, size[1])), Image.BILINEAR)


def render_views(crop: np.ndarray, rng: np.random.Generator, sides: Optional[Sequence[float]] = None,
                 views: int = 3) -> list[View]:
    """Degraded views of one reference crop, each with one or more of small, grey, dark and cut.

    `sides` are the box sides (pixels) of the run's coarse candidates so far; views are shrunk to sides
    drawn from them (or from 10-64 px without them), so calibration sees the card's own difficulty. A
    view's pixels are as small as the simulated box: the classifier and encoder upsample them as they
    upsample a small detection.
    """
    base = Image.fromarray(np.ascontiguousarray(crop[..., :3]))
    out = []
    for v in range(views):
        kinds = {KINDS[v % len(KINDS)]}
        kinds |= {k for k in KINDS if rng.random() < 0.3}
        image = base
        width, height = image.size
        if "cut" in kinds:
            keep = rng.uniform(0.5, 0.75)
            side = int(rng.integers(4))
            if side in (0, 1):
                w = max(1, int(round(width * keep)))
                x0 = 0 if side == 0 else width - w
                image = image.crop((x0, 0, x0 + w, height))
            else:
                h = max(1, int(round(height * keep)))
                y0 = 0 if side == 2 else height - h
                image = image.crop((0, y0, width, y0 + h))
            width, height = image.size
        side_px = float(min(width, height))
        if "small" in kinds:
            if sides is not None and len(sides):
                target = float(rng.choice(np.asarray(sides, dtype=np.float64)))
            else:
                target = float(rng.uniform(*_DEFAULT_SIDES))
            target = max(4.0, min(target, side_px))
            scale = target / side_px
            image = _resize(image, (int(round(width * scale)), int(round(height * scale))))
            side_px = target
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        if "grey" in kinds:
            luma = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            pixels = np.repeat(luma[..., None], 3, axis=2)
        if "dark" in kinds:
            pixels = pixels * rng.uniform(0.45, 0.9)
        out.append(View(np.clip(np.round(pixels), 0, 255).astype(np.uint8), tuple(k for k in KINDS if k in kinds),
                        side_px))
    return out


def background_patch(image: np.ndarray, boxes: Sequence[Sequence[float]], side_frac: tuple[float, float],
                     rng: np.random.Generator, tries: int = 20) -> Optional[np.ndarray]:
    """A patch of the photo that overlaps none of its detection boxes (normalised xywh): a known non-animal.

    Used as a negative in calibration: any label pass 2 would give it is wrong.
    """
    height, width = image.shape[:2]
    pw = max(8, int(round(side_frac[0] * width)))
    ph = max(8, int(round(side_frac[1] * height)))
    if pw >= width or ph >= height:
        return None
    rects = [(b[0] * width, b[1] * height, (b[0] + b[2]) * width, (b[1] + b[3]) * height) for b in boxes]
    for _ in range(tries):
        x0 = int(rng.integers(0, width - pw))
        y0 = int(rng.integers(0, height - ph))
        if all(x0 + pw <= r[0] or x0 >= r[2] or y0 + ph <= r[1] or y0 >= r[3] for r in rects):
            return np.ascontiguousarray(image[y0 : y0 + ph, x0 : x0 + pw, :3])
    return None


class ReferenceSampler:
    """Chooses which references get degraded views: the first `per_label` of each label, in card order."""

    def __init__(self, per_label: int = 20, counts: Optional[dict[str, int]] = None) -> None:
        self.per_label = per_label
        self.counts: dict[str, int] = dict(counts or {})

    def take(self, label: str) -> bool:
        """True (and counted) while this label has fewer than `per_label` sampled references."""
        if self.counts.get(label, 0) >= self.per_label:
            return False
        self.counts[label] = self.counts.get(label, 0) + 1
        return True
