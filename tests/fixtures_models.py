"""What the tests build to run on: photo folders, data-only bundles, and the session-wide SpeciesNet-format model
folder (random weights, trapedge.export.random_models) with its exported bundle, built once per test run; and the
check every exported ONNX file has to pass."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image, ImageDraw

from paths import MEDIA
from trapedge.runtime.models.bundle import MANIFEST, SCHEMA_VERSION, sha256_file

if TYPE_CHECKING:
    import onnx


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


def copy_photos(photos: Iterable[Path], folder: Path) -> list[Path]:
    """Copies photos into `folder` (made if missing) under their own names, as a card dump holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder / p.name)) for p in photos]


def data_bundle(root: Path, labels: Sequence[str], taxonomy: Sequence[str] | None = None,
                geofence: dict | None = None, **manifest: object) -> Path:
    """A bundle with its data files only (labels, taxonomy, geofence; no models), as `Bundle.load` reads it.

    `taxonomy` defaults to the labels, `geofence` to none; `manifest` adds top-level manifest keys.
    """
    root.mkdir(parents=True, exist_ok=True)
    texts = {"labels": ("labels.txt", "".join(f"{line}\n" for line in labels)),
             "taxonomy": ("taxonomy.txt", "".join(f"{line}\n" for line in (labels if taxonomy is None else taxonomy))),
             "geofence": ("geofence.json", json.dumps(geofence or {}, indent=1) + "\n")}
    files = {}
    for key, (name, text) in texts.items():
        (root / name).write_text(text, encoding="utf-8")
        files[key] = {"file": name, "sha256": sha256_file(root / name)}
    files["labels"]["count"] = len(labels)
    content = {"schema_version": SCHEMA_VERSION, "kind": "trapedge-bundle", "models": {}, "files": files, **manifest}
    (root / MANIFEST).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return root


def check_edge_onnx(path: Path, inputs: Sequence[str] | None = None,
                    outputs: Sequence[str] | None = None) -> onnx.ModelProto:
    """Asserts the settings edge targets need (trapedge.export.onnxio): IR <= MAX_IR_VERSION, opset 17, a dynamic
    batch axis on the first input; and, where given, the input and output names. Returns the model (no weights)."""
    import onnx

    from trapedge.export.onnxio import MAX_IR_VERSION

    model = onnx.load(str(path), load_external_data=False)
    assert model.ir_version <= MAX_IR_VERSION
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    if inputs is not None:
        assert [i.name for i in model.graph.input] == list(inputs)
    if outputs is not None:
        assert [o.name for o in model.graph.output] == list(outputs)
    return model


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory) -> Path:
    """A tiny random-weight SpeciesNet model folder in SpeciesNet's own on-disk formats."""
    pytest.importorskip("torch")
    pytest.importorskip("speciesnet")
    from trapedge.export.random_models import build_speciesnet_folder

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
