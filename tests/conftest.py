"""Shared fixtures: the real camera-trap photos in shared/ and paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from paths import MEDIA  # noqa: E402


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The ten real Reconyx photos (2048x1440, EXIF) shipped in shared/data."""
    found = sorted(MEDIA.glob("*.JPG"))
    if not found:
        pytest.skip(f"camera-trap photos not found at {MEDIA}")
    return found


from fixtures_models import bundle, bundle_copy, model_folder  # noqa: E402,F401  (shared fixtures)
