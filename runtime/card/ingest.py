"""Scans an SD-card dump and decodes its photos as SpeciesNet does; failures are recorded, never raised."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import PIL.Image
import PIL.ImageFile
import PIL.ImageOps

from .video import DEFAULT_EVERY_S, VideoError, frame_key, is_video, parse_frame_key, probe, read_frame, sample_frames

__all__ = ["DecodedImage", "ImageRecord", "IMAGE_EXTENSIONS", "decode", "scan"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"})
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 0x9003
_DATETIME = 0x0132
_ORIENTATION = 0x0112
_JPEG_END = b"\xff\xd9"

# SpeciesNet decodes truncated files (the readable part, grey below); trapedge does the same and
# records a warning, so a card written during a power cut keeps its usable photos.
PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True


@dataclass(frozen=True)
class ImageRecord:
    """One file found on the card: its key (path relative to the dump) and what the scan saw."""

    key: str
    path: Path
    size: int
    mtime_ns: int


@dataclass
class DecodedImage:
    """An RGB, EXIF-oriented image as SpeciesNet sees it, or the reason it could not be read."""

    record: ImageRecord
    pixels: Optional[np.ndarray] = None
    captured: Optional[str] = None
    error: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    drafted: bool = False
    full_size: Optional[tuple[int, int]] = None

    @property
    def ok(self) -> bool:
        """True when pixels were decoded."""
        return self.pixels is not None


def _hidden(name: str) -> bool:
    return name.startswith(".")


def scan(root: Path, *, video_every: float = DEFAULT_EVERY_S,
         video_every_frames: Optional[int] = None) -> Iterator[ImageRecord]:
    """Yields the dump's photos and sampled video frames in sorted key order, skipping hidden and AppleDouble
    (`._`) files; a video gives one record per sampled frame (the video's size and mtime), or one record under its
    own key when it cannot be read (decoding it records the reason)."""
    root = Path(root)
    found: list[ImageRecord] = []
    for folder, dirs, files in os.walk(root, onerror=None, followlinks=False):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        for name in files:
            video = is_video(name)
            if _hidden(name) or not (video or Path(name).suffix.lower() in IMAGE_EXTENSIONS):
                continue
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:
                stat = None
            key = path.relative_to(root).as_posix()
            record = ImageRecord(key, path, stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1)
            found.extend(_frames(record, video_every, video_every_frames) if video else [record])
    found.sort(key=lambda r: r.key)
    yield from found


def _frames(record: ImageRecord, every_s: float, every_frames: Optional[int]) -> list[ImageRecord]:
    """One record per sampled frame of a video; the video's own record when it cannot be probed."""
    try:
        info = probe(record.path)
    except (VideoError, OSError):
        return [record]
    return [ImageRecord(frame_key(record.key, n, info.fps), record.path, record.size, record.mtime_ns)
            for n in sample_frames(info, every_s, every_frames)]


def _decode_video(record: ImageRecord) -> DecodedImage:
    """A sampled frame as RGB, or the reason the frame (or the whole video) cannot be read."""
    result = DecodedImage(record)
    parsed = parse_frame_key(record.key)
    try:
        if parsed is None:
            probe(record.path)
            raise VideoError("video was unreadable when the card was scanned; run again to retry")
        result.pixels = read_frame(record.path, parsed[1])
        result.full_size = result.pixels.shape[:2]
    except VideoError as e:
        result.error = str(e)
    except (OSError, MemoryError) as e:
        result.error = f"cannot decode video: {type(e).__name__}: {e}"
    return result


def _capture_time(img: PIL.Image.Image) -> Optional[str]:
    """Reads EXIF DateTimeOriginal (else DateTime) as ISO 8601 local time without zone."""
    exif = img.getexif()
    raw = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    if not isinstance(raw, str):
        return None
    try:
        return datetime.strptime(raw.strip("\x00 "), "%Y:%m:%d %H:%M:%S").isoformat()
    except ValueError:
        return None


def _truncated_jpeg(path: Path) -> bool:
    with open(path, "rb") as fp:
        fp.seek(0, os.SEEK_END)
        fp.seek(max(0, fp.tell() - 64))
        return _JPEG_END not in fp.read()


def decode(record: ImageRecord, draft_long_side: Optional[int] = None) -> DecodedImage:
    """Decodes one photo (load, RGB, EXIF transpose, as SpeciesNet); any failure becomes `error`.

    With `draft_long_side`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps its long
    side at least that long: 2-4x cheaper for 12-20 MP photos, pixels no longer SpeciesNet's.
    """
    if parse_frame_key(record.key) is not None or is_video(record.key):
        return _decode_video(record)
    result = DecodedImage(record)
    if record.size == 0:
        result.error = "empty file (0 bytes)"
        return result
    try:
        with PIL.Image.open(record.path) as img:
            width, height = img.size
            if img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
            result.full_size = (height, width)
            if draft_long_side and img.format == "JPEG":
                scale = draft_long_side / max(img.size)
                before = img.size
                img.draft("RGB", (int(img.size[0] * scale) + 1, int(img.size[1] * scale) + 1))
                result.drafted = img.size != before
            img.load()
            fmt = img.format
            result.captured = _capture_time(img)
            rgb = PIL.ImageOps.exif_transpose(img.convert("RGB"))
        result.pixels = np.asarray(rgb)
        if fmt == "JPEG" and _truncated_jpeg(record.path):
            result.warnings.append("truncated JPEG: decoded the readable part, as SpeciesNet does")
    except PIL.Image.DecompressionBombError as e:
        result.error = f"image too large to decode safely: {e}"
    except PIL.UnidentifiedImageError:
        result.error = "not a readable image (unknown or corrupt format)"
    except (OSError, ValueError, SyntaxError, MemoryError) as e:
        result.error = f"cannot decode: {type(e).__name__}: {e}"
    return result
