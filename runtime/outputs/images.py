"""The images a run exports: a crop per labelled detection and a thumbnail per photo, people kept private."""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..atomic import atomic_write_bytes
from ..card.ingest import ImageRecord, decode
from ..card.video import parse_frame_key
from ..speciesnet.ensemble import Classification
from .taxa import common_name, final, observation_type

__all__ = [
    "CROPS",
    "PRIVACY",
    "THUMBNAILS",
    "THUMBNAIL_SIDE",
    "caption",
    "check_privacy",
    "export_images",
    "flat_name",
    "is_human",
    "label_rect",
    "labelled",
    "load_media",
    "pixel_box",
    "protect",
    "thumbnail",
]

logger = logging.getLogger("trapedge")

PRIVACY = ("blur", "box", "drop")
CROPS, THUMBNAILS = "crops", "thumbnails"
THUMBNAIL_SIDE = 640
PERSON = "2"
# A person box counts from MegaDetector's conservative threshold for MDv5a: below it the detector's boxes are
# mostly noise (NMS keeps boxes down to 0.01), and blurring or dropping on them would hide most photos.
PERSON_FLOOR = 0.05
LINE = 2
QUALITY = 90
CELLS = 2
HUMAN_COLOUR, OTHER_COLOUR, FILL = (230, 40, 40), (255, 210, 0), (0, 0, 0)
_UNSAFE = re.compile(r"[^\w .,()+-]")


def check_privacy(mode: str) -> str:
    """The privacy mode, or a ValueError naming the choices."""
    if mode not in PRIVACY:
        raise ValueError(f"unknown privacy mode {mode!r}; expected {', '.join(PRIVACY)}")
    return mode


def is_human(det: dict) -> bool:
    """A person box (detector category 2, confidence >= PERSON_FLOOR) or a detection SpeciesNet or pass 2 labels
    human."""
    if str(det.get("category")) == PERSON and float(det.get("conf", 1.0)) >= PERSON_FLOOR:
        return True
    processed = (det.get("processed_classification") or {}).get("class")
    chosen = final(det)
    relabel = chosen.label if chosen.stage != "detector" else None  # the detector's own category is handled above
    return any(label == Classification.HUMAN or observation_type(label, "") == "human"
               for label in (processed, relabel) if label)


def labelled(det: dict) -> bool:
    """True when the detection has a final label from SpeciesNet or pass 2 (not only the detector's category)."""
    return final(det).stage != "detector"


def pixel_box(bbox: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised xywh box as pixel (x0, y0, x1, y1), rounded outward, clipped, at least one pixel."""
    x0 = min(max(int(math.floor(bbox[0] * width)), 0), width - 1)
    y0 = min(max(int(math.floor(bbox[1] * height)), 0), height - 1)
    x1 = min(max(int(math.ceil((bbox[0] + bbox[2]) * width)), x0 + 1), width)
    y1 = min(max(int(math.ceil((bbox[1] + bbox[3]) * height)), y0 + 1), height)
    return x0, y0, x1, y1


def _obscure(region: Image.Image) -> Image.Image:
    """Pixelated to two cells on the long side, then blurred by the box's side: no face, shape or texture survives."""
    cell = max(2, math.ceil(max(region.size) / CELLS))
    small = region.resize((max(1, round(region.width / cell)), max(1, round(region.height / cell))), Image.BOX)
    return small.resize(region.size, Image.BILINEAR).filter(ImageFilter.GaussianBlur(2 * cell))


def protect(image: Image.Image, boxes: Iterable[Sequence[float]], mode: str) -> Image.Image:
    """A copy of the image with every given box (normalised xywh) blurred beyond recognition or filled."""
    out = image.copy()
    for bbox in boxes:
        rect = pixel_box(bbox, out.width, out.height)
        if mode == "box":
            ImageDraw.Draw(out).rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=FILL)
        else:
            out.paste(_obscure(out.crop(rect)), rect[:2])
    return out


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=14)


def caption(det: dict) -> Optional[str]:
    """A box's label on a thumbnail: "human", the final label's name and probability, or None (box not drawn)."""
    if is_human(det):
        return "human"
    if not labelled(det):
        return None
    chosen = final(det)
    return f"{common_name(chosen.label)} {chosen.probability:.2f}"


def label_rect(rect: tuple[int, int, int, int], text: str, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where a box's label goes: above the box, else below it, else inside its top edge."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=_font())
    width, height = right - left + 6, bottom - top + 4
    x0 = min(max(rect[0], 0), max(size[0] - width, 0))
    if rect[1] >= height:
        y0 = rect[1] - height
    elif rect[3] + height <= size[1]:
        y0 = rect[3]
    else:
        y0 = rect[1]
    return x0, y0, x0 + width, y0 + height


def thumbnail(image: Image.Image, detections: list[dict], side: int = THUMBNAIL_SIDE) -> Image.Image:
    """The (already protected) photo with its long side at most `side`, each labelled or human box drawn."""
    small = image.copy()
    small.thumbnail((side, side), Image.LANCZOS)
    draw = ImageDraw.Draw(small)
    for det in sorted(detections, key=is_human):
        text = caption(det)
        if text is None:
            continue
        rect = pixel_box(det["bbox"], small.width, small.height)
        colour = HUMAN_COLOUR if is_human(det) else OTHER_COLOUR
        draw.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), outline=colour, width=LINE)
        where = label_rect(rect, text, small.size)
        draw.rectangle(where, fill=colour)
        draw.text((where[0] + 3, where[1] + 2), text, fill=(0, 0, 0), font=_font())
    return small


def flat_name(key: str) -> str:
    """A file name for an image key: its folders joined by `_`, no extension; a video frame adds its index."""
    parsed = parse_frame_key(key)
    path, frame = (parsed[0], f"_frame{parsed[1]:06d}") if parsed else (key, "")
    return _safe(str(Path(path).with_suffix("")).replace("/", "_") + frame)


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip(" .") or "unknown"


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=QUALITY, subsampling=0)
    return buffer.getvalue()


def load_media(card: Path, key: str, draft_long_side: Optional[int] = None) -> Optional[Image.Image]:
    """The photo or video frame decoded as for inference (EXIF orientation applied), or None if unreadable now;
    with `draft_long_side`, a JPEG at the smallest DCT scale that keeps its long side at least that long."""
    parsed = parse_frame_key(key)
    path = card / (parsed[0] if parsed else key)
    try:
        stat = path.stat()
    except OSError:
        logger.warning("%s: not on the card any more; no crops or thumbnail exported", key)
        return None
    decoded = decode(ImageRecord(key, path, stat.st_size, stat.st_mtime_ns), draft_long_side)
    if not decoded.ok:
        logger.warning("%s: cannot decode for export (%s)", key, decoded.error)
        return None
    return Image.fromarray(decoded.pixels)


def export_images(out: Path, card: Path, predictions: list[dict], privacy: str = "blur") -> list[Path]:
    """Writes OUT/crops/<label>/<name>_<i>.jpg and OUT/thumbnails/<name>.jpg for every photo and video frame with
    detections; human boxes are blurred, filled or (drop) their photo left out; human crops are never written.
    Files a previous export left that this one did not write are removed. Returns the folders written."""
    check_privacy(privacy)
    out, card = Path(out), Path(card).resolve()
    written: set[Path] = set()
    for prediction in predictions:
        detections = prediction.get("detections") or []
        if not detections or prediction.get("failures"):
            continue
        humans = [det["bbox"] for det in detections if is_human(det)]
        if humans and privacy == "drop":
            continue
        key = Path(prediction["filepath"]).relative_to(card).as_posix()
        image = load_media(card, key)
        if image is None:
            continue
        safe = protect(image, humans, privacy)
        name = flat_name(key)
        for index, det in enumerate(detections):
            if is_human(det) or not labelled(det):
                continue
            path = out / CROPS / _safe(common_name(final(det).label)) / f"{name}_{index}.jpg"
            atomic_write_bytes(path, _jpeg(safe.crop(pixel_box(det["bbox"], safe.width, safe.height))))
            written.add(path)
        path = out / THUMBNAILS / f"{name}.jpg"
        atomic_write_bytes(path, _jpeg(thumbnail(safe, detections)))
        written.add(path)
    _remove_stale(out, written)
    return [out / folder for folder in (CROPS, THUMBNAILS) if (out / folder).is_dir()]


def _remove_stale(out: Path, written: set[Path]) -> None:
    """Deletes exported images this export did not write (so a stricter mode leaves nothing of a looser one)."""
    for folder in (out / CROPS, out / THUMBNAILS):
        if not folder.is_dir():
            continue
        for path in folder.rglob("*.jpg"):
            if path not in written:
                path.unlink()
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
            if not any(sub.iterdir()):
                sub.rmdir()
