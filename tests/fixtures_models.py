"""Session-wide SpeciesNet-format model folder and its exported bundle, built once per test run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from paths import MEDIA


def _cache_root(tmp_path_factory) -> Path:
    configured = os.environ.get("TRAPEDGE_TEST_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("models")


def generated_photos(folder: Path, count: int = 3, size: tuple[int, int] = (1600, 1200)) -> list[Path]:
    """Synthetic 4:3 scenes (textured ground, blobs); 4:3 keeps boxes out of letterbox padding."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    paths = []
    for i in range(count):
        ground = rng.normal(110, 30, (size[1] // 8, size[0] // 8, 3)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(ground).resize(size, Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(1, 4)):
            x, y = rng.integers(0, size[0] - 300), rng.integers(0, size[1] - 300)
            w, h = rng.integers(80, 300, 2)
            draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / f"generated_{i:02d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory) -> Path:
    """A tiny random-weight SpeciesNet model folder in SpeciesNet's own on-disk formats."""
    pytest.importorskip("torch")
    pytest.importorskip("speciesnet")
    from modelfolder import build_speciesnet_folder

    folder = _cache_root(tmp_path_factory) / "speciesnet-tiny"
    if not (folder / "info.json").is_file():
        build_speciesnet_folder(folder, size="tiny", seed=0, calibration_images=sorted(MEDIA.glob("*.JPG")))
    return folder


@pytest.fixture(scope="session")
def bundle(model_folder: Path, tmp_path_factory) -> Path:
    """The tiny model folder exported with `trapedge export speciesnet`."""
    from trapedge.export.speciesnet import export_speciesnet

    out = _cache_root(tmp_path_factory) / "bundle-tiny"
    if not (out / "manifest.json").is_file():
        export_speciesnet(str(model_folder), out, parity_images=MEDIA)
    return out


@pytest.fixture()
def bundle_copy(bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the bundle that a test may damage."""
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))
