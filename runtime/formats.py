"""Result files in the formats the ecosystem reads, each written atomically (temp, fsync, rename)."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .ensemble import FORMAT_VERSION

__all__ = ["atomic_write_text", "limit_float_precision", "write_images_csv", "write_predictions_json"]

_DECIMALS = 4


def atomic_write_text(path: Path, text: str) -> None:
    """Writes a file so that a reader (or a power cut) sees the old file or the new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fp:
            fp.write(text)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def limit_float_precision(obj: Any, decimals: int = _DECIMALS) -> Any:
    """Rounds every float in nested lists and dicts, as SpeciesNet does before writing."""
    if isinstance(obj, float):
        return round(obj, decimals)
    if isinstance(obj, dict):
        return {k: limit_float_precision(v, decimals) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [limit_float_precision(v, decimals) for v in obj]
    return obj


def write_predictions_json(path: Path, predictions: list[dict], info: dict | None = None) -> None:
    """Writes SpeciesNet 5.x predictions.json (format 20261015), floats rounded to 4 decimals."""
    document = {"info": {"format_version": FORMAT_VERSION, **(info or {})}, "predictions": predictions}
    text = json.dumps(limit_float_precision(document), ensure_ascii=False, indent=1)
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
