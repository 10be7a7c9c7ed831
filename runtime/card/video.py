"""Video clips on a card: probe frame rate and count, choose the sampled frames, decode one frame to RGB."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = [
    "DEFAULT_EVERY_S", "VIDEO_EXTENSIONS", "VideoError", "VideoInfo", "frame_key", "is_video", "parse_frame_key",
    "probe", "read_frame", "sample_frames", "video_key",
]

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov"})
DEFAULT_EVERY_S = 1.0
_FRAME_KEY = re.compile(r"^(?P<video>.+)#frame=(?P<frame>\d+)&fps=(?P<fps>[0-9.e+-]+)$")


class VideoError(Exception):
    """A video (or one of its frames) that cannot be read, with the reason as its message."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says: frames per second, frame count, frame size."""

    fps: float
    frames: int
    width: int
    height: int


def is_video(path: Union[str, Path]) -> bool:
    """True for a file name ending in .mp4, .avi or .mov (any case)."""
    return Path(str(path)).suffix.lower() in VIDEO_EXTENSIONS


def frame_key(video: str, frame: int, fps: float) -> str:
    """The key of one sampled frame: the video's key, the frame index and the video's frame rate."""
    return f"{video}#frame={frame:06d}&fps={round(fps, 6):g}"


def parse_frame_key(key: str) -> Optional[tuple[str, int, float]]:
    """(video key, frame index, frame rate) of a frame key, else None."""
    match = _FRAME_KEY.match(key)
    if match is None:
        return None
    return match["video"], int(match["frame"]), float(match["fps"])


def video_key(key: str) -> Optional[str]:
    """The video a key belongs to (a sampled frame or an unreadable video), else None."""
    parsed = parse_frame_key(key)
    if parsed is not None:
        return parsed[0]
    return key if is_video(key) else None


def _open(path: Path):
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own "moov atom not found": the reason is ours
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # OpenCV's capture warnings, likewise

    if not Path(path).is_file():
        raise VideoError("cannot open video: file not found")
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise VideoError("not a readable video (unknown, corrupt or truncated container)")
    return capture


def probe(path: Path) -> VideoInfo:
    """Frame rate, frame count and size from the container; an unreadable video raises VideoError."""
    import cv2

    if Path(path).stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    capture = _open(path)
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()
    if not np.isfinite(fps) or fps <= 0:
        raise VideoError(f"video has no usable frame rate ({fps})")
    if frames <= 0 or width <= 0 or height <= 0:
        raise VideoError(f"video has no frames ({frames} frames of {width}x{height})")
    return VideoInfo(fps, frames, width, height)


def sample_frames(info: VideoInfo, every_s: float = DEFAULT_EVERY_S, every_frames: Optional[int] = None) -> list[int]:
    """Frame indices to process: every Nth frame if given, else one every `every_s` seconds (at least every frame)."""
    if every_frames is not None:
        if every_frames < 1:
            raise ValueError(f"every_frames must be >= 1 (got {every_frames})")
        step = every_frames
    else:
        if not every_s > 0:
            raise ValueError(f"every_s must be > 0 seconds (got {every_s})")
        step = max(1, int(every_s * info.fps))
    return list(range(0, info.frames, step))


def read_frame(path: Path, frame: int) -> np.ndarray:
    """Decodes one frame (seek by index) to an RGB array; a frame that cannot be read raises VideoError."""
    import cv2

    capture = _open(path)
    try:
        if frame and not capture.set(cv2.CAP_PROP_POS_FRAMES, frame):
            raise VideoError(f"cannot seek to frame {frame}")
        ok, bgr = capture.read()
    except cv2.error as e:
        raise VideoError(f"cannot decode frame {frame}: {e}") from e
    finally:
        capture.release()
    if not ok or bgr is None or bgr.size == 0:
        raise VideoError(f"cannot decode frame {frame} (truncated or corrupt video)")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
