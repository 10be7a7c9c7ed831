"""Writes a corpus of awkward files an SD card can hold; each entry says whether it should decode."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims a huge size (no pixel data needed to refuse it)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature + (length, type)
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def make_bad_corpus(root: Path, photo: Path) -> dict[str, bool]:
    """Fills `root` with bad and unusual images; returns {relative key: should decode}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = Image.open(photo).convert("RGB").resize((640, 450))
    raw = photo.read_bytes()
    expected: dict[str, bool] = {}

    def put(name: str, ok: bool) -> Path:
        expected[name] = ok
        return root / name

    put("zero_bytes.jpg", False).write_bytes(b"")
    put("truncated.jpg", True).write_bytes(raw[: len(raw) // 3])
    corrupt = bytearray(raw)
    corrupt[2:600] = rng.integers(0, 256, 598, dtype=np.uint8).tobytes()
    put("corrupt_header.jpg", False).write_bytes(bytes(corrupt))
    put("notes.jpg", False).write_text("this is a text file with a .jpg name\n")
    put("huge_20000x20000.png", False).write_bytes(_png_claiming(20000, 20000))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (450, 640), dtype=np.uint8)))
    rgba.save(put("alpha.png", True))
    base.convert("L").save(put("gray.jpg", True))
    base.convert("CMYK").save(put("cmyk.jpg", True))
    gray16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(put("sixteen_bit.png", True))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    exif[0x0132] = "2024:05:06 07:08:09"
    base.save(put("rotated.jpg", True), exif=exif)
    dangling = put("unreadable.jpg", False)
    os.symlink(root / "does-not-exist.jpg", dangling)
    return expected
