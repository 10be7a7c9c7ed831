"""`trapedge run` (torch made unimportable) against SpeciesNet's own pipeline on the same weights and photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fixtures_models import copy_photos, generated_photos
from paths import TESTS

LEAN = TESTS / "lean"
COUNTRY, ADMIN1 = "USA", "CA"
BOX_TOL = 1e-3
CONF_TOL = 1e-3
SCORE_TOL = 1e-4
DETECTION_THRESHOLDS = (0.1, 0.2, 0.5, 0.7)
CROP_FLIP_TOL = 5e-3  # a crop where float32 rounding flipped a pixel by 1 (this random classifier is touchy)
ROUNDING = 1e-4  # both files round to 4 decimals, so values within x differ by at most x + 1e-4 after


def lean_env() -> dict:
    """Environment in which torch, open_clip and speciesnet cannot be imported."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(LEAN), os.environ.get("PYTHONPATH", "")]))


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs the trapedge CLI in a lean subprocess."""
    proc = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", *args], capture_output=True,
                          text=True, env=lean_env())
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def dump(tmp_path_factory, photos) -> Path:
    root = tmp_path_factory.mktemp("card")
    copy_photos(photos, root / "100MEDIA")
    generated_photos(root / "101MEDIA")
    return root


def _speciesnet_predictions(model_folder: Path, files: list[Path]) -> tuple[dict, list[str]]:
    """SpeciesNet's own pipeline, image by image; where SpeciesNet 5.0.6 raises on an empty crop, its
    own detector, classifier and ensemble are applied to that image's non-empty crops instead."""
    from speciesnet import SpeciesNet

    model = SpeciesNet(str(model_folder), components="all", geofence=True)
    kwargs = dict(country=COUNTRY, admin1_region=ADMIN1, run_mode="single_thread", batch_size=1)
    results, patched = {}, []
    for f in files:
        try:
            out = model.predict(filepaths=[str(f)], **kwargs)
        except RuntimeError as e:
            assert "greater than 0" in str(e)
            results[str(f)] = _speciesnet_components(model_folder, f)
            patched.append(str(f))
            continue
        results.update({p["filepath"]: p for p in out["predictions"]})
    return results, patched


def _speciesnet_components(model_folder: Path, path: Path) -> dict:
    """SpeciesNet's components on one image, skipping only the crops SpeciesNet cannot make."""
    from speciesnet.classifier import SpeciesNetClassifier
    from speciesnet.detector import SpeciesNetDetector
    from speciesnet.ensemble import SpeciesNetEnsemble
    from speciesnet.ensemble_prediction_combiner import combine_predictions
    from speciesnet.geofence_utils import geofence_animal_classification, roll_up_labels_to_first_matching_level
    from speciesnet.utils import BBox, load_rgb_image

    detector = SpeciesNetDetector(str(model_folder))
    img = load_rgb_image(str(path))
    detected = detector.predict(str(path), detector.preprocess(img))
    classifier = SpeciesNetClassifier(str(model_folder), device="cpu")
    ensemble = SpeciesNetEnsemble(str(model_folder), geofence=True)
    for det in detected["detections"]:
        if det["conf"] < 0.1:
            continue
        try:
            crops = classifier.preprocess(img, bboxes=[BBox(*det["bbox"])])
        except RuntimeError:
            det["empty_crop"] = True
            continue
        top5 = classifier.batch_predict([str(path)], [crops])[0]["classifications_list"][0]
        det["processed_classification"] = combine_predictions(
            classifications_list=[top5], detections=[det], country=COUNTRY, admin1_region=ADMIN1,
            taxonomy_map=ensemble.taxonomy_map, geofence_map=ensemble.geofence_map, enable_geofence=True,
            geofence_fn=geofence_animal_classification, roll_up_fn=roll_up_labels_to_first_matching_level)[0]
        det["raw_classifications"] = {k: v[:2] for k, v in top5.items()}
    detected.update(country=COUNTRY, admin1_region=ADMIN1, model_version=ensemble.model_info.version)
    return detected


def _drop_threshold_hairs(ours: list[dict], theirs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Drops detections a float32 hair from the 0.01 NMS threshold that only one side kept."""
    hair = 0.01 + CONF_TOL + ROUNDING
    if len(ours) == len(theirs):
        return ours, theirs
    longer, shorter = (ours, theirs) if len(ours) > len(theirs) else (theirs, ours)
    extra = len(longer) - len(shorter)
    trimmed = [d for d in longer if d["conf"] > hair] + [d for d in longer if d["conf"] <= hair][extra:]
    assert len(trimmed) == len(shorter), "detections differ beyond the NMS threshold's float noise"
    trimmed.sort(key=lambda d: d["conf"], reverse=True)
    return (trimmed, shorter) if longer is ours else (shorter, trimmed)


def _pair(ours: list[dict], theirs: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs detections by category, confidence and box (near-equal confidences may swap order)."""
    left = list(ours)
    pairs = []
    for e in theirs:
        g = min(left, key=lambda d: (d["category"] != e["category"], abs(d["conf"] - e["conf"]) > CONF_TOL + ROUNDING,
                                     max(abs(a - b) for a, b in zip(d["bbox"], e["bbox"]))))
        left.remove(g)
        pairs.append((g, e))
    return pairs


def _tied(scores: list[float], ours: list[str], theirs: list[str]) -> bool:
    """True when classes differ only where SpeciesNet's scores tie, or at the last listed rank (its rival is not listed)."""
    tol = 2 * (SCORE_TOL + ROUNDING)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b and not any(abs(scores[i] - scores[j]) <= tol for j in range(len(scores)) if j != i) \
                and i + 1 < len(scores):
            return False
    return True


def _crops_identical(path: str, bbox: list[float], size: tuple[int, int]) -> bool:
    """True when trapedge's 480x480 crop equals SpeciesNet's for this box, pixel for pixel."""
    import numpy as np
    from speciesnet.classifier import SpeciesNetClassifier
    from speciesnet.utils import BBox, load_rgb_image

    from trapedge.runtime.speciesnet.classifier import preprocess_crop
    from trapedge.runtime.speciesnet.detector import normalised_bbox

    exact = normalised_bbox(*_pixels(bbox, size), *size)
    img = load_rgb_image(path)
    reference = object.__new__(SpeciesNetClassifier)
    reference.model_info = type("Info", (), {"type_": "always_crop"})()
    theirs = reference.preprocess(img, bboxes=[BBox(*exact)])[0].arr
    return bool(np.array_equal(preprocess_crop(np.asarray(img), exact), theirs))


def _pixels(bbox: list[float], size: tuple[int, int]) -> tuple[int, ...]:
    """Integer pixel box behind a normalised, 4-decimal bbox (exact for images under 5,000 px)."""
    w, h = size
    x, y, bw, bh = bbox
    return round(x * w), round(y * h), round((x + bw) * w), round((y + bh) * h)


def _near_threshold(conf: float) -> bool:
    return any(abs(conf - t) <= CONF_TOL for t in DETECTION_THRESHOLDS)


def test_trapedge_matches_speciesnet(model_folder: Path, bundle: Path, dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("run", str(dump), "--bundle", str(bundle), "--out", str(out),
                   "--country", COUNTRY, "--admin1", ADMIN1, "--device", "cpu")
    assert "CPUExecutionProvider" in proc.stderr
    ours = json.loads((out / "predictions.json").read_text())
    assert ours["info"]["format_version"] == "20261015"
    ours_by_path = {p["filepath"]: p for p in ours["predictions"]}

    files = sorted(p for p in dump.rglob("*") if p.is_file())
    theirs, excluded = _speciesnet_predictions(model_folder, files)
    from speciesnet.utils import limit_float_precision

    assert set(ours_by_path) == {str(f.resolve()) for f in files}
    compared_dets = classified = empty_crops = moved = ties = crop_flips = 0
    diverged: list[str] = []
    sources = set()
    for path, expected in theirs.items():
        expected = limit_float_precision(expected, 4)
        got = ours_by_path[str(Path(path).resolve())]
        size = Image.open(path).size
        assert got.get("failures") == expected.get("failures"), path
        assert (got.get("country"), got.get("admin1_region")) == (COUNTRY, ADMIN1)
        assert got["model_version"] == expected["model_version"]
        try:
            ours_dets, theirs_dets = _drop_threshold_hairs(got["detections"], expected["detections"])
            pairs = _pair(ours_dets, theirs_dets)
            for g, e in pairs:
                assert g["category"] == e["category"] and g["label"] == e["label"]
                assert abs(g["conf"] - e["conf"]) <= CONF_TOL + ROUNDING
                assert all(abs(a - b) <= BOX_TOL + ROUNDING for a, b in zip(g["bbox"], e["bbox"]))
        except AssertionError:
            # This random-weight detector has near-tied class scores in some rows; float32 noise between
            # onnxruntime and torch can flip a row's argmax (animal vs vehicle), and NMS then keeps a
            # different box. Tolerated on at most two images and reported; the real MegaDetector's
            # outputs are far better conditioned (see the export parity numbers).
            diverged.append(path)
            continue
        for g, e in pairs:
            compared_dets += 1
            if _near_threshold(e["conf"]):
                continue  # a float32 hair either side of a decision threshold may classify differently
            if _pixels(g["bbox"], size) != _pixels(e["bbox"], size):
                moved += 1
                continue  # detector float noise rounded a box edge to the next pixel: a different crop
            if e.get("empty_crop"):
                assert "raw_classifications" not in g, path  # SpeciesNet raises here; trapedge skips
                empty_crops += 1
                continue
            assert ("raw_classifications" in g) == ("raw_classifications" in e), path
            if "raw_classifications" not in e:
                continue
            g_raw, e_raw = g["raw_classifications"], e["raw_classifications"]
            same_crop = _crops_identical(path, e["bbox"], size)
            tol = SCORE_TOL if same_crop else CROP_FLIP_TOL
            crop_flips += not same_crop
            for a, b in zip(g_raw["scores"], e_raw["scores"]):
                assert abs(a - b) <= tol + ROUNDING, (path, a, b, same_crop)
            if g_raw["classes"] != e_raw["classes"]:
                assert _tied(e_raw["scores"], g_raw["classes"], e_raw["classes"]), (path, g_raw, e_raw)
                ties += 1
                continue
            gp, ep = g["processed_classification"], e["processed_classification"]
            assert (gp["class"], gp["source"]) == (ep["class"], ep["source"]), path
            tol = CONF_TOL if gp["source"] == "detector" else (SCORE_TOL if same_crop else CROP_FLIP_TOL)
            assert abs(gp["score"] - ep["score"]) <= tol + ROUNDING, (path, gp, ep)
            sources.add(ep["source"])
            classified += 1
    assert compared_dets >= 20 and classified >= 10
    assert len(sources) >= 2, sources
    for path in excluded:
        assert any("thinner than a pixel" in w for w in _warnings(out, path)), path
    print(f"compared {compared_dets} detections, {classified} classified, sources {sorted(sources)}, "
          f"{len(excluded)} images where SpeciesNet raises compared component by component, "
          f"{empty_crops} empty crops skipped, {moved} boxes a pixel apart not score-compared, {ties} near-tied class orders, {crop_flips} crops with a float-rounding pixel flip, images with diverging boxes {diverged}")
    assert moved <= compared_dets // 10
    assert crop_flips <= classified // 2
    assert len(diverged) <= 2, diverged


def _warnings(out: Path, path: str) -> list[str]:
    import csv

    with open(out / "images.csv", newline="") as fp:
        return [row["reason"] for row in csv.DictReader(fp) if row["filepath"] == str(Path(path).resolve())]
