"""SpeciesNet 5.x predictions.json and images.csv, the per-image info every writer pairs with, JSON dumping helpers."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from ..atomic import atomic_write_text
from ..speciesnet.ensemble import FORMAT_VERSION

if TYPE_CHECKING:
    from ..pipeline import ImageResult

__all__ = [
    "DECIMALS",
    "ImageInfo",
    "dump_lines",
    "image_failed",
    "limit_float_precision",
    "model_versions",
    "pair_images",
    "write_images_csv",
    "write_predictions_json",
]

DECIMALS = 4


def limit_float_precision(obj: Any, decimals: int = DECIMALS) -> Any:
    """Rounds every float in nested lists and dicts, as SpeciesNet does before writing."""
    if isinstance(obj, float):
        return round(obj, decimals)
    if isinstance(obj, dict):
        return {k: limit_float_precision(v, decimals) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [limit_float_precision(v, decimals) for v in obj]
    return obj


def dump_lines(document: dict, rows: str) -> str:
    """JSON with one line per entry of `document[rows]`: readable, and encoded by json's C encoder
    (an `indent` forces the pure-Python encoder, several times slower on a 5,000-image card)."""
    head = {k: v for k, v in document.items() if k != rows}
    items = ",\n  ".join(json.dumps(item, ensure_ascii=False) for item in document[rows])
    body = json.dumps(head, ensure_ascii=False)[:-1]
    sep = ", " if head else ""
    return f'{body}{sep}"{rows}": [\n  {items}\n]}}' if document[rows] else f'{body}{sep}"{rows}": []}}'


def write_predictions_json(path: Path, predictions: list[dict], info: dict | None = None) -> None:
    """Writes SpeciesNet 5.x predictions.json (format 20261015), floats rounded to 4 decimals."""
    document = {"info": {"format_version": FORMAT_VERSION, **(info or {})}, "predictions": predictions}
    text = dump_lines(limit_float_precision(document), "predictions")
    atomic_write_text(path, text + "\n")


def write_images_csv(path: Path, rows: Iterable[dict]) -> None:
    """Writes one row per image: key, path, size, capture time, status and reason."""
    fields = ["key", "filepath", "width", "height", "captured", "status", "reason"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


@dataclass(frozen=True)
class ImageInfo:
    """One image: dump-relative key, prediction filepath, size, naive camera-local EXIF time, status, file mtime."""

    key: str
    filepath: str
    width: Optional[int] = None
    height: Optional[int] = None
    captured: Optional[str] = None
    status: str = "ok"
    reason: str = ""
    modified_ns: Optional[int] = None

    @classmethod
    def from_result(cls, result: ImageResult) -> ImageInfo:
        """Builds the info of one pass-1 result."""
        mtime = result.record.mtime_ns
        return cls(key=result.record.key, filepath=result.prediction["filepath"], width=result.width,
                   height=result.height, captured=result.captured, status=result.status,
                   reason=result.error or "; ".join(result.warnings),
                   modified_ns=mtime if mtime is not None and mtime >= 0 else None)

    def row(self) -> dict:
        """The images.csv row of this image."""
        return {"key": self.key, "filepath": self.filepath, "width": self.width, "height": self.height,
                "captured": self.captured, "status": self.status, "reason": self.reason}


def pair_images(predictions: list[dict], images: dict[str, ImageInfo]) -> list[tuple[dict, ImageInfo]]:
    """Pairs every prediction with its image info (found by filepath), sorted by key."""
    by_path = {info.filepath: info for info in images.values()}
    pairs = []
    for pred in predictions:
        info = by_path.get(pred["filepath"])
        if info is None:
            raise ValueError(f"no ImageInfo for prediction {pred['filepath']!r}")
        pairs.append((pred, info))
    pairs.sort(key=lambda pair: pair[1].key)
    return pairs


def image_failed(pred: dict, info: ImageInfo) -> bool:
    """True when the image could not be processed (a prediction failure or a failed status)."""
    return bool(pred.get("failures")) or info.status == "failed"


def model_versions(predictions: list[dict]) -> str:
    """The SpeciesNet model versions of the predictions, sorted and comma-separated ("unknown" when none)."""
    return ", ".join(sorted({str(p.get("model_version", "unknown")) for p in predictions})) or "unknown"
