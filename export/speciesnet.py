"""SpeciesNet model folder (Kaggle id, HF id or local) to a trapedge bundle: classifier and MegaDetector as ONNX."""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from trapedge.runtime import __version__
from trapedge.runtime.speciesnet import detector as det_ops
from trapedge.runtime.models.bundle import MANIFEST, SCHEMA_VERSION, sha256_file
from trapedge.runtime.speciesnet.classifier import CROP_SIZE
from trapedge.runtime.card.ingest import IMAGE_EXTENSIONS

from .megadetectors import megadetector
from .onnxio import export_onnx
from .parity import compare_outputs, ort_session, topk_agreement, torch_outputs

__all__ = ["ClassifierWithFeatures", "DetectorForExport", "export_speciesnet"]

logger = logging.getLogger("trapedge.export")

DEFAULT_SOURCE = "kaggle:google/speciesnet/pyTorch/v4.0.3a/1"
PARITY_SEED = 20261128


class ClassifierWithFeatures(torch.nn.Module):
    """SpeciesNet's classifier returning (logits, pooled features): the input of its last linear layer."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        linears = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError("the classifier has no final linear layer to take pooled features from")
        self._head = linears[-1]
        self._captured: list[torch.Tensor] = []
        self._head.register_forward_pre_hook(self._capture)

    def _capture(self, module: torch.nn.Module, inputs: tuple) -> None:
        self._captured.append(inputs[0])

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature vector."""
        return int(self._head.in_features)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured.clear()
        logits = self.classifier(crops)
        features = self._captured[-1].reshape(crops.shape[0], -1)
        return logits, features


class DetectorForExport(torch.nn.Module):
    """A YOLOv5 model returning only its raw prediction rows (N, anchors, 5 + classes); NMS stays outside."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images, augment=False)
        return out[0] if isinstance(out, (tuple, list)) else out


def _prepare_detector(model: torch.nn.Module) -> torch.nn.Module:
    """Fuses conv+BN and switches YOLOv5's Detect layer to export mode with per-call grids."""
    model = model.float().cpu().eval()
    with torch.no_grad():
        if hasattr(model, "fuse"):
            model = model.fuse()
    model.requires_grad_(False)
    for module in model.modules():
        if type(module).__name__ == "Detect":
            module.export = True
            module.inplace = False
            module.dynamic = True
        if isinstance(module, torch.nn.Upsample) and not hasattr(module, "recompute_scale_factor"):
            module.recompute_scale_factor = None
    return model


def _parity_photos(folder: Optional[Path], limit: int = 4) -> list[np.ndarray]:
    from PIL import Image, ImageOps

    if folder is None:
        return []
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    return [np.asarray(ImageOps.exif_transpose(Image.open(p).convert("RGB"))) for p in paths]


def _classifier_inputs(photos: list[np.ndarray], count: int = 4) -> np.ndarray:
    from trapedge.runtime.speciesnet.classifier import preprocess_crop, to_network_input

    rng = np.random.default_rng(PARITY_SEED)
    crops = [preprocess_crop(p, [0.2, 0.2, 0.5, 0.5]) for p in photos]
    crops += [rng.integers(0, 256, (CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8) for _ in range(count)]
    return to_network_input(crops)


def _detector_inputs(photos: list[np.ndarray], config: det_ops.DetectorConfig) -> list[np.ndarray]:
    rng = np.random.default_rng(PARITY_SEED)
    images = photos[:2] or [rng.integers(0, 256, (1440, 2048, 3), dtype=np.uint8)]
    images = images + [rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)]
    return [det_ops.to_network_input([det_ops.letterbox(im, config)]) for im in images]


def _io_spec(name: str, shape: list) -> dict:
    return {"name": name, "dtype": "float32", "shape": shape}


def export_classifier(classifier: torch.nn.Module, labels: list[str], out: Path, opset: int,
                      photos: list[np.ndarray], log: Callable) -> dict:
    """Writes classifier.onnx (logits and pooled features) and returns its manifest entry."""
    wrapped = ClassifierWithFeatures(classifier.float().cpu().eval()).eval()
    path = out / "classifier.onnx"
    example = torch.rand(2, CROP_SIZE, CROP_SIZE, 3)
    batch = _classifier_inputs(photos)
    reference = torch_outputs(wrapped, batch)  # before export: tracing may touch module state
    exporter = export_onnx(
        copy.deepcopy(wrapped), example, path, input_name="crops", output_names=["logits", "features"],
        dynamic_dims={0: "batch"}, opset=opset,
        dynamo_shapes=lambda: {"crops": {0: torch.export.Dim("batch", min=1, max=256)}}, log=log,
    )
    candidate = ort_session(path).run(["logits", "features"], {"crops": batch})
    if reference[0].shape[-1] != len(labels):
        raise ValueError(f"classifier has {reference[0].shape[-1]} outputs but {len(labels)} labels")
    parity = compare_outputs(["logits", "features"], reference, candidate)
    parity.update(
        inputs=f"{len(batch)} crops: {len(photos)} from parity photos, the rest uniform noise (seed {PARITY_SEED})",
        top1_agreement=topk_agreement(reference[0], candidate[0], 1),
        top5_agreement=topk_agreement(reference[0], candidate[0], 5),
    )
    return {
        "file": path.name, "sha256": sha256_file(path), "format": "onnx", "opset": opset,
        "exporter": exporter,
        "inputs": [_io_spec("crops", ["batch", CROP_SIZE, CROP_SIZE, 3])],
        "outputs": [_io_spec("logits", ["batch", len(labels)]),
                    _io_spec("features", ["batch", int(reference[1].shape[-1])])],
        "preprocessing": {"layout": "NHWC", "size": CROP_SIZE, "crop": "integer-truncated box",
                          "resize": "bilinear", "antialias": False, "uint8_roundtrip": True,
                          "scale": "1/255"},
        "parity": parity,
    }


def export_detector(model: torch.nn.Module, out: Path, opset: int, photos: list[np.ndarray],
                    log: Callable, config: det_ops.DetectorConfig = det_ops.DetectorConfig()) -> dict:
    """Writes detector.onnx (dynamic batch, height and width) and returns its manifest entry."""
    wrapped = DetectorForExport(_prepare_detector(model)).eval()
    path = out / "detector.onnx"
    example = torch.rand(2, 3, config.image_size * 3 // 5 // config.stride * config.stride, config.image_size)

    # The TorchScript exporter, as YOLOv5's own export uses: the dynamo exporter emits opset 18 and the
    # ONNX version converter has no opset 18 -> 17 adapter for the Split these graphs contain.
    batches = _detector_inputs(photos, config)
    references = [torch_outputs(wrapped, batch) for batch in batches]
    exporter = export_onnx(
        copy.deepcopy(wrapped), example, path, input_name="images", output_names=["predictions"],
        dynamic_dims={0: "batch", 2: "height", 3: "width"}, opset=opset, dynamo_shapes=None, log=log,
    )
    session = ort_session(path)
    diffs = []
    for batch, reference in zip(batches, references):
        candidate = session.run(["predictions"], {"images": batch})
        diffs.append(compare_outputs(["predictions"], reference, candidate)["predictions"])
    return {
        "file": path.name, "sha256": sha256_file(path), "format": "onnx", "opset": opset,
        "exporter": exporter,
        "inputs": [_io_spec("images", ["batch", 3, "height", "width"])],
        "outputs": [_io_spec("predictions", ["batch", "anchors", int(references[0][0].shape[-1])])],
        "preprocessing": {"layout": "NCHW", "image_size": config.image_size, "stride": config.stride,
                          "pad_value": config.pad_value, "conf_threshold": config.conf_threshold,
                          "iou_threshold": config.iou_threshold, "max_detections": config.max_detections,
                          "scale": "1/255"},
        "categories": det_ops.CATEGORY_LABELS,
        "parity": {
            "max_abs_diff": max(d["max_abs_diff"] for d in diffs),
            "max_rel_diff": max(d["max_rel_diff"] for d in diffs),
            "inputs": f"{len(diffs)} letterboxed images ({len(photos[:2])} parity photos, the rest noise)",
        },
    }


def export_speciesnet(
    source: str = DEFAULT_SOURCE,
    out: Path = Path("artifacts/speciesnet"),
    *,
    opset: int = 17,
    parity_images: Optional[Path] = None,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Exports a SpeciesNet model through the speciesnet package's own loaders; returns the manifest."""
    from speciesnet.classifier import SpeciesNetClassifier
    from speciesnet.detector import SpeciesNetDetector

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"loading SpeciesNet model {source}")
    classifier = SpeciesNetClassifier(source, device="cpu")
    info = classifier.model_info
    if info.type_ != "always_crop":
        raise ValueError(f"{source}: model type {info.type_!r} is not supported; use an always_crop model (v4.0.xa)")
    detector = SpeciesNetDetector(source)
    photos = _parity_photos(parity_images)

    log("exporting the classifier")
    classifier_entry = export_classifier(classifier.model, list(classifier.labels), out, opset, photos, log)
    log("exporting MegaDetector")
    detector_entry = export_detector(detector.model, out, opset, photos, log)
    checkpoint = Path(info.detector).name
    detector_entry["megadetector"] = {**megadetector("mdv5a").manifest(), "checkpoint": {"file": checkpoint}}
    if checkpoint.startswith("md_v5a.") and checkpoint.endswith(".pt"):
        detector_entry["megadetector"]["version"] = checkpoint[3:-3]

    files = {}
    for name, src, dest in (("labels", info.classifier_labels, "labels.txt"),
                            ("taxonomy", info.taxonomy, "taxonomy.txt"),
                            ("geofence", info.geofence, "geofence.json")):
        shutil.copyfile(src, out / dest)
        files[name] = {"file": dest, "sha256": sha256_file(out / dest)}
    files["labels"]["count"] = len(classifier.labels)

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "trapedge-bundle",
        "trapedge_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "speciesnet": {"source": source, "model_version": info.version, "model_type": info.type_,
                       "detection_threshold_for_classification": 0.1},
        "models": {"detector": detector_entry, "classifier": classifier_entry},
        "files": files,
        "torch_version": torch.__version__,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
