"""A published MegaDetector checkpoint (MDv5a, MDv1000 redwood or spruce) to a bundle's detector, with parity."""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from trapedge.runtime.atomic import atomic_write_json
from trapedge.runtime.models.bundle import MANIFEST, SCHEMA_VERSION, sha256_file
from trapedge.runtime.speciesnet.detector import DetectorConfig

from .megadetectors import MegaDetector, megadetector
from .speciesnet import _parity_photos, export_detector

__all__ = ["check_architecture", "export_megadetector", "read_checkpoint", "read_metadata"]

logger = logging.getLogger("trapedge.export")
METADATA = "megadetector_info.json"


def read_metadata(path: Path) -> dict:
    """The `megadetector_info.json` the megadetector package reads from a checkpoint's zip folder ({} if none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            roots = {name.split("/")[0] for name in names}
            member = f"{next(iter(roots))}/{METADATA}" if len(roots) == 1 else None
            if member not in names:
                return {}
            found = json.loads(archive.read(member).decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def read_checkpoint(path: Path) -> torch.nn.Module:
    """The float, eval-mode YOLOv5 model of a checkpoint dict {'model': ...} as MegaDetector publishes it."""
    import yolov5.models.yolo  # noqa: F401  (adds the yolov5 package's `models` and `utils` that checkpoints pickle)

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (a pickle fails in many ways; each is one line here)
        raise ValueError(f"{path}: not a loadable YOLOv5 checkpoint ({type(e).__name__}: {e})") from e
    model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{path}: not a YOLOv5 checkpoint dict with a 'model' entry, as MegaDetector publishes")
    for module in model.modules():
        if isinstance(module, torch.nn.Upsample) and not hasattr(module, "recompute_scale_factor"):
            module.recompute_scale_factor = None
    return model.float().eval()


def check_architecture(model: torch.nn.Module, spec: MegaDetector, metadata: dict, path: Path) -> None:
    """Refuses a checkpoint whose architecture, classes, stride or image size is not the named model's."""
    import yolov5

    expected = yaml.safe_load((Path(yolov5.__file__).parent / spec.yolo_config).read_text())
    found = getattr(model, "yaml", None) or {}
    multiples = (found.get("depth_multiple"), found.get("width_multiple"))
    if multiples != (expected["depth_multiple"], expected["width_multiple"]):
        raise ValueError(f"{path}: depth/width multiples {multiples} are not {spec.architecture}'s "
                         f"({expected['depth_multiple']}, {expected['width_multiple']}); is it {spec.name}?")
    stride = int(model.stride.max()) if hasattr(model, "stride") else None
    if stride != spec.stride:
        raise ValueError(f"{path}: stride {stride} is not {spec.name}'s {spec.stride}")
    classes = getattr(model.model[-1], "nc", None)
    if classes != 3:
        raise ValueError(f"{path}: {classes} classes; MegaDetector has 3 (animal, person, vehicle)")
    version = metadata.get("model_version_string")
    same_family = spec.key == "mdv5a" and str(version).startswith("v5a.")
    if version is not None and version != spec.version and not same_family:
        raise ValueError(f"{path}: its metadata names {version}, not {spec.name} ({spec.version})")
    size = metadata.get("image_size")
    if size is not None and int(size) != spec.image_size:
        raise ValueError(f"{path}: its metadata says image_size {size}, not {spec.name}'s {spec.image_size}")


def _read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: no manifest.json; export a bundle first (trapedge export speciesnet)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("schema_version") != SCHEMA_VERSION or not isinstance(manifest.get("models"), dict):
        raise ValueError(f"{path}: not a schema {SCHEMA_VERSION} trapedge manifest with a 'models' section")
    return manifest


def _drop_variants(bundle: Path, manifest: dict, log: Callable[[str], None]) -> None:
    for name in [n for n, e in manifest["models"].items() if e.get("base_model") == "detector"]:
        entry = manifest["models"].pop(name)
        (bundle / entry["file"]).unlink(missing_ok=True)
        log(f"removed models.{name} ({entry['file']}): it was quantised from the replaced detector")


def export_megadetector(
    source: Path,
    bundle: Path,
    model: str,
    *,
    opset: int = 17,
    parity_images: Optional[Path] = None,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Replaces a bundle's detector with a MegaDetector checkpoint exported to ONNX; returns the new entry."""
    spec = megadetector(model)
    source, bundle = Path(source), Path(bundle)
    manifest = _read_manifest(bundle)
    log(f"loading {spec.name} ({spec.architecture} at {spec.image_size}) from {source}")
    net = read_checkpoint(source)
    check_architecture(net, spec, read_metadata(source), source)
    config = DetectorConfig(image_size=spec.image_size, stride=spec.stride, model=spec.name,
                            typical_threshold=spec.typical_threshold,
                            conservative_threshold=spec.conservative_threshold)
    staging = bundle / ".detector-export"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        entry = export_detector(net, staging, opset, _parity_photos(parity_images), log, config)
        name = "detector.onnx" if spec.key == "mdv5a" else f"detector_{spec.key}.onnx"
        os.replace(staging / entry["file"], bundle / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entry["file"] = name
    entry["megadetector"] = {**spec.manifest(), "checkpoint": {"file": source.name, "sha256": sha256_file(source)}}
    previous = manifest["models"].get("detector", {}).get("file")
    _drop_variants(bundle, manifest, log)
    manifest["models"]["detector"] = entry
    atomic_write_json(bundle / MANIFEST, manifest)
    if previous and previous != name:
        (bundle / previous).unlink(missing_ok=True)
    return entry
