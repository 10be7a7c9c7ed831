"""MDv1000 light detectors: `trapedge export detector` and trapedge's runtime detector (letterbox, ONNX, NMS) against
the megadetector package's own `PTDetector` on random-weight checkpoints in the published format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from fixtures_models import check_edge_onnx, copy_photos, data_bundle
from paths import MEDIA
from test_end_to_end import run_cli
from trapedge.runtime.models.bundle import Bundle
from trapedge.runtime.speciesnet import detector as det_ops

torch = pytest.importorskip("torch")
pytest.importorskip("yolov5")
pytest.importorskip("megadetector")

from trapedge.export.detector import export_megadetector, read_metadata  # noqa: E402
from trapedge.export.megadetectors import MEGADETECTORS  # noqa: E402
from trapedge.export.random_detectors import build_megadetector_checkpoint  # noqa: E402

# Stated tolerances, trapedge (ONNX Runtime, numpy NMS) against PTDetector (torch, torchvision NMS), with
# PTDetector's output truncation (3 decimals of conf, 4 of coordinates) switched off so float noise is what is
# measured. Spruce is well conditioned: torch fp32 and fp64 agree to ~2e-6 in confidence.
CONF_TOL = 1e-4
BOX_TOL = 1e-5  # normalised coordinates, when both sides round the box edges to the same pixels
PIXEL = 1.01 / 1440  # one pixel of a 2048x1440 photo: a box edge float noise rounded the other way
# The random BN-calibrated YOLOv5x6 (redwood) is not: torch fp32 itself differs from torch fp64 by ~3e-3 in
# confidence and ~20 px in raw boxes on these photos, and ONNX Runtime sits closer to fp64 than torch fp32 does.
# Its boxes are paired by IoU and its confidences within the model's own fp32 noise.
REDWOOD_CONF_TOL = 5e-3
REDWOOD_IOU = 0.9
REDWOOD_THRESHOLD = 0.05
SPRUCE_LOG = "detector MDv1000-spruce: letterbox 640, stride 32, typical confidence threshold 0.3"
LABELS = [f"{i:08d}-0000-0000-0000-000000000000;mammalia;o;f;g;s{i};c{i}" for i in range(3)]


@pytest.fixture(scope="module")
def spruce(tmp_path_factory, photos) -> Path:
    """A random-weight MDv1000-spruce checkpoint (YOLOv5s), batch norm calibrated on four sample photos."""
    dest = tmp_path_factory.mktemp("spruce") / MEGADETECTORS["spruce"].file
    return build_megadetector_checkpoint(dest, "spruce", seed=0, calibration_images=photos[:4])


@pytest.fixture()
def untruncated(monkeypatch):
    """PTDetector with its output rounding (a formatting step) off."""
    from megadetector.utils import ct_utils

    monkeypatch.setattr(ct_utils, "truncate_float", lambda x, precision=None: x)
    monkeypatch.setattr(ct_utils, "truncate_float_array", lambda xs, precision=None: list(xs))


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img.convert("RGB")))


def _trapedge(bundle: Path, images: list[np.ndarray]) -> tuple[det_ops.DetectorConfig, list[list[dict]]]:
    """trapedge's runtime detector as pass 1 runs it: the manifest's config, letterbox, ONNX, NMS."""
    import onnxruntime as ort

    spec = Bundle.load(bundle).model("detector")
    config = det_ops.DetectorConfig.from_manifest(spec.raw)
    session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    found = []
    for image in images:
        boxed = det_ops.letterbox(image, config)
        (raw,) = session.run(["predictions"], {"images": det_ops.to_network_input([boxed])})
        found.append(det_ops.postprocess(raw[0], boxed.shape, boxed, config))
    return config, found


def _megadetector(checkpoint: Path, images: list[np.ndarray], threshold: float) -> list[list[dict]]:
    """The megadetector package's PTDetector (classic mode, as run_detector_batch runs it) on the same pixels."""
    from megadetector.detection.pytorch_detector import PTDetector

    detector = PTDetector(str(checkpoint), {"force_cpu": True})
    return [detector.generate_detections_one_image(Image.fromarray(im), f"{i}.jpg",
                                                   detection_threshold=threshold)["detections"]
            for i, im in enumerate(images)]


def _iou(a: list[float], b: list[float]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else float(a == b)  # boxes clipped to zero area at the image edge


def _pair(ours: list[dict], theirs: list[dict]) -> tuple[list[tuple[dict, dict]], list[dict], list[dict]]:
    """Pairs each PTDetector box with trapedge's nearest of the same category; returns pairs and the leftovers."""
    left, pairs, missed = list(ours), [], []
    for e in sorted(theirs, key=lambda d: -d["conf"]):
        same = [d for d in left if d["category"] == e["category"]]
        if not same:
            missed.append(e)
            continue
        g = max(same, key=lambda d: (_iou(d["bbox"], e["bbox"]), -max(abs(a - b) for a, b in zip(d["bbox"], e["bbox"])),
                                     -abs(d["conf"] - e["conf"])))
        left.remove(g)
        pairs.append((g, e))
    return pairs, missed, left


def _export(bundle: Path, checkpoint: Path, model: str) -> dict:
    export_megadetector(checkpoint, bundle, model, parity_images=MEDIA, log=print)
    return json.loads((bundle / "manifest.json").read_text())["models"]["detector"]


def test_table_matches_the_megadetector_package() -> None:
    from megadetector.detection.run_detector import known_models, model_url_base

    for key in ("redwood", "spruce"):
        spec = MEGADETECTORS[key]
        assert known_models[spec.version]["url"] == model_url_base + spec.file
        assert spec.typical_threshold == 0.3 and spec.conservative_threshold is None
    redwood = known_models["v1000.0.0-redwood"]["typical_detection_threshold"]
    assert redwood == MEGADETECTORS["redwood"].typical_threshold
    v5a = known_models["v5a.0.1"]
    assert (v5a["typical_detection_threshold"], v5a["conservative_detection_threshold"]) == (0.2, 0.05)
    assert (MEGADETECTORS["mdv5a"].typical_threshold, MEGADETECTORS["mdv5a"].conservative_threshold) == (0.2, 0.05)
    assert [(s.image_size, s.stride) for s in MEGADETECTORS.values()] == [(1280, 64), (1280, 64), (640, 32)]


def test_old_bundle_keeps_mdv5a_values() -> None:
    old = {"preprocessing": {"layout": "NCHW", "image_size": 1280, "stride": 64, "pad_value": 114,
                             "conf_threshold": 0.01, "iou_threshold": 0.45, "max_detections": 300, "scale": "1/255"}}
    assert det_ops.DetectorConfig.from_manifest(old) == det_ops.DetectorConfig()
    assert det_ops.DetectorConfig.from_manifest({}) == det_ops.DetectorConfig()
    config = det_ops.DetectorConfig.from_manifest(
        {"preprocessing": {"image_size": 640, "stride": 32},
         "megadetector": {"name": "MDv1000-spruce", "typical_detection_threshold": 0.3,
                          "conservative_detection_threshold": None}})
    assert (config.image_size, config.stride, config.model, config.typical_threshold,
            config.conservative_threshold) == (640, 32, "MDv1000-spruce", 0.3, None)
    with pytest.raises(ValueError, match="multiple of its stride"):
        det_ops.DetectorConfig.from_manifest({"preprocessing": {"image_size": 650, "stride": 32}})


def test_wrong_model_name_is_refused(spruce: Path, tmp_path: Path) -> None:
    bundle = data_bundle(tmp_path / "b", LABELS)
    with pytest.raises(ValueError, match="not YOLOv5x6's"):
        export_megadetector(spruce, bundle, "redwood", log=print)
    assert not (bundle / "detector_redwood.onnx").exists()


def test_spruce_matches_megadetector(spruce: Path, photos: list[Path], tmp_path: Path, untruncated) -> None:
    assert read_metadata(spruce)["image_size"] == 640
    bundle = data_bundle(tmp_path / "b", LABELS)
    entry = _export(bundle, spruce, "spruce")
    check_edge_onnx(bundle / entry["file"], ["images"], ["predictions"])
    assert entry["file"] == "detector_spruce.onnx"
    assert (entry["preprocessing"]["image_size"], entry["preprocessing"]["stride"]) == (640, 32)
    facts = entry["megadetector"]
    assert (facts["name"], facts["typical_detection_threshold"], facts["gflops"]) == ("MDv1000-spruce", 0.3, 16.5)
    assert entry["parity"]["max_rel_diff"] < 5e-4  # raw rows, including a uniform-noise image it was not calibrated on

    images = [_rgb(p) for p in photos]
    config, ours = _trapedge(bundle, images)
    assert max(det_ops.letterbox(images[0], config).shape) == 640
    theirs = _megadetector(spruce, images, config.conf_threshold)
    compared = flips = 0
    max_box = max_conf = 0.0
    for got, expected in zip(ours, theirs):
        pairs, missed, extra = _pair(got, expected)
        for d in missed + extra:  # only a float hair from the 0.01 threshold may be on one side only
            assert abs(d["conf"] - config.conf_threshold) <= CONF_TOL, d
        for g, e in pairs:
            box = max(abs(a - b) for a, b in zip(g["bbox"], e["bbox"]))
            assert box <= PIXEL, (g, e)
            flips += box > BOX_TOL
            max_box, max_conf = max(max_box, box), max(max_conf, abs(g["conf"] - e["conf"]))
            compared += 1
    print(f"spruce: {compared} boxes on {len(images)} photos, max |d conf| {max_conf:.2e}, max |d box| "
          f"{max_box:.2e}, {flips} with an edge a pixel apart")
    assert compared >= 200
    assert max_conf <= CONF_TOL
    assert flips <= compared // 20


@pytest.mark.slow
def test_redwood_matches_megadetector(photos: list[Path], tmp_path: Path, untruncated) -> None:
    checkpoint = build_megadetector_checkpoint(tmp_path / MEGADETECTORS["redwood"].file, "redwood", seed=0,
                                               calibration_images=photos[:4])
    assert read_metadata(checkpoint)["model_version_string"] == "v1000.0.0-redwood"
    bundle = data_bundle(tmp_path / "b", LABELS)
    entry = _export(bundle, checkpoint, "redwood")
    assert (entry["preprocessing"]["image_size"], entry["preprocessing"]["stride"]) == (1280, 64)
    assert entry["megadetector"]["typical_detection_threshold"] == 0.3

    images = [_rgb(p) for p in photos[4:7]]
    config, ours = _trapedge(bundle, images)
    theirs = _megadetector(checkpoint, images, REDWOOD_THRESHOLD)
    compared = unmatched = total = 0
    max_conf, min_iou = 0.0, 1.0
    for got, expected in zip(ours, theirs):
        got = [d for d in got if d["conf"] > REDWOOD_THRESHOLD]
        pairs, missed, _ = _pair(got, expected)
        total += len(expected)
        for g, e in pairs:
            iou, dconf = _iou(g["bbox"], e["bbox"]), abs(g["conf"] - e["conf"])
            if iou < REDWOOD_IOU or dconf > REDWOOD_CONF_TOL:
                unmatched += 1
                continue
            compared += 1
            max_conf, min_iou = max(max_conf, dconf), min(min_iou, iou)
        unmatched += len(missed)
    print(f"redwood: {compared} of {total} boxes above {REDWOOD_THRESHOLD} paired on {len(images)} photos, "
          f"max |d conf| {max_conf:.2e}, min IoU {min_iou:.4f}, {unmatched} unpaired")
    assert compared >= 50
    assert unmatched <= total // 20


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    """`trapedge export ...` in a subprocess with the export extra importable."""
    return subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "export", *args], capture_output=True,
                          text=True)


def test_spruce_bundle_runs_end_to_end(bundle_copy: Path, photos: list[Path], tmp_path: Path, untruncated) -> None:
    spruce = build_megadetector_checkpoint(tmp_path / MEGADETECTORS["spruce"].file, "spruce", seed=0,
                                           calibration_images=photos[:4], objectness_shift=1.0)
    proc = _export_cli("detector", "--bundle", str(bundle_copy), str(spruce), "--model", "redwood")
    assert proc.returncode != 0 and "not YOLOv5x6's" in proc.stderr.strip().splitlines()[-1]
    proc = _export_cli("detector", "--bundle", str(bundle_copy), str(spruce), "--model", "spruce",
                       "--parity-images", str(MEDIA))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MDv1000-spruce at 640 (stride 32), typical threshold 0.3" in proc.stderr
    loaded = Bundle.load(bundle_copy)
    assert loaded.model("detector").path.name == "detector_spruce.onnx"
    assert not (bundle_copy / "detector.onnx").exists()

    card = tmp_path / "card"
    copied = copy_photos(photos[:3], card / "100MEDIA")
    out = tmp_path / "out"
    proc = run_cli("run", str(card), "--bundle", str(bundle_copy), "--out", str(out), "--device", "cpu",
                   "--country", "USA", "--admin1", "CA")
    assert SPRUCE_LOG in proc.stderr
    predictions = {p["filepath"]: p for p in json.loads((out / "predictions.json").read_text())["predictions"]}
    theirs = _megadetector(spruce, [_rgb(p) for p in copied], 0.01)
    compared = classified = 0
    for path, expected in zip(copied, theirs):
        got = predictions[str(path.resolve())]["detections"]
        classified += sum("processed_classification" in d for d in got)
        # Both keep the 300 most confident boxes after NMS: compare those clear of that cut.
        # (predictions.json keeps 4 decimals, and boxes are dense near the cut, so a margin of two roundings).
        cut = max(min(d["conf"] for d in got), min(d["conf"] for d in expected)) + 1e-3
        got = [d for d in got if d["conf"] > cut]
        expected = [d for d in expected if d["conf"] > cut + 2e-4]
        pairs, missed, extra = _pair(got, expected)
        assert not missed and all(d["conf"] <= cut + 3e-4 for d in extra), (missed, extra)
        for g, e in pairs:
            assert abs(g["conf"] - e["conf"]) <= CONF_TOL + 1e-4  # predictions.json keeps 4 decimals
            assert max(abs(a - b) for a, b in zip(g["bbox"], e["bbox"])) <= PIXEL + 1e-4
            compared += 1
    print(f"spruce run: {compared} boxes against PTDetector, {classified} classified by SpeciesNet's ensemble")
    assert compared >= 50 and classified >= 3
    info = json.loads((out / "megadetector.json").read_text())["info"]
    assert info["detector"].startswith("md_v1000.0.0-spruce ")
    assert info["detector_metadata"] == {"megadetector_version": "v1000.0.0-spruce",
                                         "typical_detection_threshold": 0.3}  # none conservative published
