"""Random-weight MegaDetector checkpoints (MDv5a, MDv1000 redwood, spruce) in the published on-disk format.

The format is YOLOv5's checkpoint dict with the half-precision model under 'model', as MegaDetector publishes it;
MDv1000 files also carry `megadetector_info.json` in their zip folder (format version, model version string, image
size, model type: the fields the megadetector package reads; it assumes 1280 without an image size). Batch-norm
statistics come from letterboxed photos (`random_models.calibrate_batchnorm`), so activations neither vanish nor
explode and low-confidence boxes exist.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import yaml

from trapedge.runtime.speciesnet import detector as det_ops

from .detector import METADATA
from .megadetectors import MegaDetector, megadetector
from .random_models import calibrate_batchnorm

__all__ = ["build_megadetector_checkpoint", "write_metadata"]


def _photo(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as img:
        return np.asarray(PIL.ImageOps.exif_transpose(img.convert("RGB")))


def _calibration_batches(spec: MegaDetector, images: Sequence[Path], seed: int) -> list[torch.Tensor]:
    config = det_ops.DetectorConfig(image_size=spec.image_size, stride=spec.stride)
    arrays = [_photo(p) for p in images]
    if not arrays:
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 256, (2, 9, 12, 3), dtype=np.uint8)
        arrays = [np.asarray(PIL.Image.fromarray(c).resize((2048, 1440), PIL.Image.BICUBIC)) for c in coarse]
    return [torch.from_numpy(det_ops.to_network_input([det_ops.letterbox(a, config)])) for a in arrays]


def _build(spec: MegaDetector, batches: list[torch.Tensor], seed: int) -> torch.nn.Module:
    import yolov5
    from yolov5.models.yolo import Model

    cfg = yaml.safe_load((Path(yolov5.__file__).parent / spec.yolo_config).read_text())
    cfg["nc"] = 3
    yolo_log = logging.getLogger("yolov5")
    level = yolo_log.level
    yolo_log.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
            torch.manual_seed(seed)
            model = Model(cfg, ch=3)
    finally:
        yolo_log.setLevel(level)
    model.names = ["animal", "person", "vehicle"]
    return calibrate_batchnorm(model, batches)


def write_metadata(path: Path, metadata: dict) -> None:
    """Adds `megadetector_info.json` to a torch checkpoint's zip folder, where the megadetector package looks."""
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        roots = {name.split("/")[0] for name in archive.namelist()}
        if len(roots) != 1:
            raise ValueError(f"{path}: not a torch zip checkpoint with one top-level folder")
        archive.writestr(f"{next(iter(roots))}/{METADATA}", json.dumps(metadata, indent=1))


def _shift_objectness(model: torch.nn.Module, shift: float) -> None:
    detect = model.model[-1]
    with torch.no_grad():
        for conv in detect.m:
            conv.bias.view(detect.na, -1)[:, 4] += shift


def build_megadetector_checkpoint(
    dest: Path, model: str, *, seed: int = 0, calibration_images: Sequence[Path] = (), objectness_shift: float = 0.0
) -> Path:
    """Writes a random-weight checkpoint of `model` (mdv5a, redwood, spruce) to `dest` and returns it.

    `objectness_shift` is added to every anchor's objectness logit, for boxes confident enough to be classified.
    """
    spec = megadetector(model)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    net = _build(spec, _calibration_batches(spec, sorted(calibration_images), seed), seed)
    _shift_objectness(net, objectness_shift)
    checkpoint = {"epoch": -1, "best_fitness": None, "model": net.half(), "ema": None, "updates": None,
                  "optimizer": None, "wandb_id": None, "date": "2025-07-01T00:00:00"}
    torch.save(checkpoint, dest)
    if spec.key != "mdv5a":
        write_metadata(dest, {"metadata_format_version": 1.0, "model_version_string": spec.version,
                              "image_size": spec.image_size, "model_type": "yolov5"})
    return dest
