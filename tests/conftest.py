"""Shared fixtures: the real camera-trap photos in shared/ and paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

REPO = TESTS.parent
MEDIA = REPO.parent / "shared" / "data" / "camtrap-dp-1.0.2" / "example" / "media"


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The ten real Reconyx photos (2048x1440, EXIF) shipped in shared/data."""
    found = sorted(MEDIA.glob("*.JPG"))
    if not found:
        pytest.skip(f"camera-trap photos not found at {MEDIA}")
    return found
