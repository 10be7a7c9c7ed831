"""`--export-crops` and `--privacy`: crops and thumbnails of a real card, people blurred, filled or left out."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trapedge.runtime.card.ingest import ImageRecord, decode
from trapedge.runtime.demo import build_demo_bundle, sample_photos
from trapedge.runtime.models.bundle import sha256_file
from trapedge.runtime.outputs.images import (
    CROPS, LINE, THUMBNAILS, caption, check_privacy, flat_name, is_human, label_rect, pixel_box,
)
from trapedge.runtime.outputs.report import REPORT_NAME
from trapedge.runtime.outputs.store import STORE_NAME, Store
from trapedge.runtime.outputs.taxa import common_name, final
from trapedge.runtime.speciesnet.ensemble import Classification
from trapedge.runtime.station import Station

from test_end_to_end import run_cli

EDGE_RATIO = 0.05  # a protected human box keeps under 5% of the photo's edge energy (mean |Laplacian|) there
VARIANCE_RATIO = 0.05  # ... and under 5% of its grey-level variance
KEPT_RATIO = 0.5  # a box that is not human keeps at least half of its edge energy (JPEG at quality 90)
MARGIN = LINE + 8  # pixels of drawn outline and JPEG ringing (one 8x8 block) left out at a box's edge
MIN_PIXELS = 100
MEASURED: dict[str, list[float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    """Prints the measured ratios when the module ends (see them with -s)."""
    yield
    for name, values in sorted(MEASURED.items()):
        print(f"\n{name}: n={len(values)} min={min(values):.5f} max={max(values):.5f}", end="")


def _person_detector(path: Path) -> None:
    """The demo's saliency detector with its lower-left cells called person: strongly left of x=660 (letterbox
    pixels), weakly (below SpeciesNet's 0.7 human override) up to x=720, animal elsewhere."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    const = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(v, dtype=np.float32), name))
    vec = lambda *v: np.array(v, dtype=np.float32).reshape(1, 3, 1, 1)  # noqa: E731
    animal, weak, strong = vec(0.9, 0.06, 0.04), vec(0.35, 0.6, 0.05), vec(0.05, 0.9, 0.05)
    rule = [
        const("animal", animal), const("weak_shift", weak - animal), const("strong_shift", strong - weak),
        const("x_weak", [720.0]), const("x_strong", [660.0]), const("y_low", [640.0]),
        helper.make_node("Less", ["cx", "x_weak"], ["left_weak"]),
        helper.make_node("Less", ["cx", "x_strong"], ["left_strong"]),
        helper.make_node("Greater", ["cy", "y_low"], ["low"]),
        helper.make_node("And", ["left_weak", "low"], ["is_weak"]),
        helper.make_node("And", ["left_strong", "low"], ["is_strong"]),
        helper.make_node("Cast", ["is_weak"], ["weak_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Cast", ["is_strong"], ["strong_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["weak_f", "weak_shift"], ["weak_part"]),
        helper.make_node("Mul", ["strong_f", "strong_shift"], ["strong_part"]),
        helper.make_node("Add", ["animal", "weak_part"], ["partial"]),
        helper.make_node("Add", ["partial", "strong_part"], ["probs"]),
    ]
    nodes = [n for n in model.graph.node if n.output[0] not in ("cls", "probs")]
    at = next(i for i, n in enumerate(nodes) if n.output[0] == "rows")
    del model.graph.node[:]
    model.graph.node.extend(nodes[:at] + rule + nodes[at:])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def person_bundle(tmp_path_factory) -> Path:
    bundle = build_demo_bundle(tmp_path_factory.mktemp("privacy") / "bundle")
    _person_detector(bundle / "detector.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["models"]["detector"]["sha256"] = sha256_file(bundle / "detector.onnx")
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return bundle


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> Path:
    """The ten real photos, plus one saved sideways with EXIF orientation 6 in a second folder."""
    root = tmp_path_factory.mktemp("card")
    (root / "DCIM" / "100MEDIA").mkdir(parents=True)
    for photo in sample_photos():
        shutil.copy2(photo, root / "DCIM" / "100MEDIA" / photo.name)
    (root / "DCIM" / "101MEDIA").mkdir()
    with Image.open(sample_photos()[0]) as img:
        exif = img.getexif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(root / "DCIM" / "101MEDIA" / "SIDEWAYS.JPG", exif=exif,
                                                      quality=95)
    return root


@pytest.fixture(scope="module")
def runs(person_bundle: Path, card: Path, tmp_path_factory) -> dict[str, Path]:
    """blur in-process; box through the CLI; drop as a rerun of a blur folder (stale exports must go)."""
    root = tmp_path_factory.mktemp("runs")
    Station(person_bundle, privacy="blur").run(card, root / "blur", export_crops=True, log=lambda m: None)
    run_cli("run", str(card), "--bundle", str(person_bundle), "--out", str(root / "box"), "--export-crops",
            "--privacy", "box", "--quiet")
    shutil.copytree(root / "blur", root / "drop")
    Station(person_bundle, privacy="drop").run(card, root / "drop", export_crops=True, log=lambda m: None)
    return {"blur": root / "blur", "box": root / "box", "drop": root / "drop"}


def _predictions(out: Path) -> list[dict]:
    store = Store(out / STORE_NAME)
    try:
        card = Path(store.get_meta("dump_root"))
        return [{**p, "key": Path(p["filepath"]).relative_to(card).as_posix()} for p in store.predictions(card)]
    finally:
        store.close()


def _photo(card: Path, key: str) -> Image.Image:
    path = card / key
    decoded = decode(ImageRecord(key, path, path.stat().st_size, path.stat().st_mtime_ns))
    return Image.fromarray(decoded.pixels)


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def _edge(grey: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian over the masked pixels."""
    lap = np.abs(4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
    return float(lap[mask[1:-1, 1:-1]].mean())


def _rect_mask(shape: tuple[int, int], rect: tuple[int, int, int, int], inset: int = 0) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = rect
    mask[max(y0 + inset, 0):max(y1 - inset, 0), max(x0 + inset, 0):max(x1 - inset, 0)] = True
    return mask


def _drawn(shape: tuple[int, int], detections: list[dict]) -> np.ndarray:
    """Pixels a thumbnail draws on (box outlines and label tags), widened by the margin."""
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    for det in detections:
        text = caption(det)
        if text is None:
            continue
        rect = pixel_box(det["bbox"], width, height)
        mask |= _rect_mask(shape, (rect[0] - MARGIN, rect[1] - MARGIN, rect[2] + MARGIN, rect[3] + MARGIN)) & \
            ~_rect_mask(shape, rect, MARGIN)
        tag = label_rect(rect, text, (width, height))
        mask |= _rect_mask(shape, (tag[0] - MARGIN, tag[1] - MARGIN, tag[2] + MARGIN, tag[3] + MARGIN))
    return mask


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_the_person_bundle_gives_people_of_both_kinds(runs: dict[str, Path]) -> None:
    """Strong person boxes SpeciesNet calls human, weak ones it labels otherwise, and photos with no person."""
    predictions = _predictions(runs["blur"])
    persons = [d for p in predictions for d in p.get("detections", []) if d["category"] == "2"]
    assert any((d.get("processed_classification") or {}).get("class") == Classification.HUMAN for d in persons)
    assert any((d.get("processed_classification") or {}).get("class") not in (None, Classification.HUMAN)
               for d in persons), "no person box with a non-human label: the embedding check would prove less"
    assert any(p.get("detections") and not any(is_human(d) for d in p["detections"]) for p in predictions)


def _check_thumbnail(exported: Image.Image, card: Path, prediction: dict, label: str) -> tuple[int, int]:
    """Asserts every human box of an exported thumbnail is below 5% of the photo's edge energy and variance there,
    and every other labelled box keeps half of its edge energy; returns how many of each were measured."""
    detections = prediction.get("detections") or []
    original = _photo(card, prediction["key"])
    original.thumbnail((exported.width, exported.height), Image.LANCZOS)
    assert original.size == exported.size
    after, before = _grey(exported), _grey(original)
    drawn = _drawn(after.shape, detections)
    human_rects = [pixel_box(d["bbox"], exported.width, exported.height) for d in detections if is_human(d)]
    humans = kept = 0
    for rect in human_rects:
        mask = _rect_mask(after.shape, rect, MARGIN) & ~drawn
        if mask.sum() < MIN_PIXELS:
            continue
        edge = _edge(after, mask) / _edge(before, mask)
        variance = after[mask].var() / before[mask].var()
        MEASURED.setdefault(f"{label} human edge ratio", []).append(edge)
        MEASURED.setdefault(f"{label} human variance ratio", []).append(variance)
        assert edge < EDGE_RATIO and variance < VARIANCE_RATIO, (prediction["key"], rect, edge, variance)
        humans += 1
    for det in detections:
        rect = pixel_box(det["bbox"], exported.width, exported.height)
        if is_human(det) or caption(det) is None or any(_overlaps(rect, h) for h in human_rects):
            continue
        mask = _rect_mask(after.shape, rect, MARGIN) & ~drawn
        if mask.sum() < MIN_PIXELS:
            continue
        edge = _edge(after, mask) / _edge(before, mask)
        MEASURED.setdefault(f"{label} animal edge ratio", []).append(edge)
        assert edge > KEPT_RATIO, (prediction["key"], rect, edge)
        kept += 1
    return humans, kept


@pytest.mark.parametrize("mode", ["blur", "box"])
def test_people_in_thumbnails_carry_no_detail_and_animals_keep_theirs(runs: dict[str, Path], card: Path,
                                                                     mode: str) -> None:
    """Inside every human box of every thumbnail, edge energy and variance fall below 5% of the photo's."""
    humans = kept = 0
    for prediction in _predictions(runs[mode]):
        if not prediction.get("detections"):
            continue
        exported = Image.open(runs[mode] / THUMBNAILS / f"{flat_name(prediction['key'])}.jpg")
        measured = _check_thumbnail(exported, card, prediction, f"{mode} thumbnail")
        humans, kept = humans + measured[0], kept + measured[1]
    assert humans >= 3 and kept >= 10, (humans, kept)


@pytest.mark.parametrize("mode", ["blur", "box", "drop"])
def test_people_in_the_report_carry_no_detail_or_are_left_out(runs: dict[str, Path], card: Path, mode: str) -> None:
    """report.html's thumbnails (data URIs) meet the same bound; under drop none shows a photo with a person."""
    page = (runs[mode] / REPORT_NAME).read_text()
    found = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)" data-key="([^"]+)"', page)
    by_key = {p["key"]: p for p in _predictions(runs[mode])}
    humans = shown = 0
    for data, key in found:
        prediction = by_key[html.unescape(key)]
        with_people = any(is_human(d) for d in prediction["detections"])
        assert not (mode == "drop" and with_people), key
        exported = Image.open(io.BytesIO(base64.b64decode(data)))
        humans += _check_thumbnail(exported, card, prediction, f"{mode} report")[0]
        shown += with_people
    assert len(found) >= 3
    if mode != "drop":
        assert shown >= 1 and humans >= 1, (shown, humans)


@pytest.mark.parametrize("mode", ["blur", "box"])
def test_crops_that_reach_into_a_human_box_are_protected_there(runs: dict[str, Path], card: Path,
                                                               mode: str) -> None:
    """An animal crop overlapping a person shows that part blurred or filled (cut from the protected photo)."""
    checked = 0
    for prediction in _predictions(runs[mode]):
        detections = prediction.get("detections") or []
        if not any(is_human(d) for d in detections):
            continue
        original = _photo(card, prediction["key"])
        size = original.size
        humans = [pixel_box(d["bbox"], *size) for d in detections if is_human(d)]
        for index, det in enumerate(detections):
            if is_human(det) or caption(det) is None:
                continue
            rect = pixel_box(det["bbox"], *size)
            crop = runs[mode] / CROPS / common_name(final(det).label) / f"{flat_name(prediction['key'])}_{index}.jpg"
            exported = Image.open(crop)
            assert exported.size == (rect[2] - rect[0], rect[3] - rect[1])
            after, before = _grey(exported), _grey(original.crop(rect))
            for human in humans:
                if not _overlaps(rect, human):
                    continue
                inside = (max(rect[0], human[0]) - rect[0], max(rect[1], human[1]) - rect[1],
                          min(rect[2], human[2]) - rect[0], min(rect[3], human[3]) - rect[1])
                mask = _rect_mask(after.shape, inside, MARGIN)
                if mask.sum() < MIN_PIXELS:
                    continue
                edge = _edge(after, mask) / _edge(before, mask)
                MEASURED.setdefault(f"{mode} crop part inside a human box edge ratio", []).append(edge)
                assert edge < EDGE_RATIO, (crop.name, edge)
                checked += 1
    assert checked >= 1


@pytest.mark.parametrize("mode", ["blur", "box", "drop"])
def test_no_run_exports_a_human_crop_and_every_other_labelled_detection_has_one(runs: dict[str, Path],
                                                                               mode: str) -> None:
    """Crops are exactly the labelled non-human detections (of photos with no person, under drop)."""
    expected = set()
    for prediction in _predictions(runs[mode]):
        detections = prediction.get("detections") or []
        if mode == "drop" and any(is_human(d) for d in detections):
            continue
        for index, det in enumerate(detections):
            if caption(det) is not None and not is_human(det):
                expected.add(f"{common_name(final(det).label)}/{flat_name(prediction['key'])}_{index}.jpg")
    found = {p.relative_to(runs[mode] / CROPS).as_posix() for p in (runs[mode] / CROPS).rglob("*.jpg")}
    assert found == expected and found
    assert not (runs[mode] / CROPS / "human").exists()


def test_drop_leaves_out_every_photo_with_a_person_even_from_an_earlier_blur_export(runs: dict[str, Path]) -> None:
    predictions = _predictions(runs["drop"])
    with_people = {flat_name(p["key"]) for p in predictions if any(is_human(d) for d in p.get("detections") or [])}
    others = {flat_name(p["key"]) for p in predictions if p.get("detections")} - with_people
    thumbnails = {p.stem for p in (runs["drop"] / THUMBNAILS).glob("*.jpg")}
    crops = {p.stem.rsplit("_", 1)[0] for p in (runs["drop"] / CROPS).rglob("*.jpg")}
    assert with_people and thumbnails == others
    assert not crops & with_people
    assert with_people <= {p.stem for p in (runs["blur"] / THUMBNAILS).glob("*.jpg")}


def test_a_photo_stored_sideways_is_exported_as_inference_saw_it(runs: dict[str, Path], card: Path) -> None:
    """Portrait pixels with EXIF orientation 6 are the first photo upright: same boxes, landscape exports."""
    with Image.open(card / "DCIM" / "101MEDIA" / "SIDEWAYS.JPG") as raw:
        assert raw.height > raw.width
    thumb = Image.open(runs["blur"] / THUMBNAILS / "DCIM_101MEDIA_SIDEWAYS.jpg")
    assert thumb.width == 640 and thumb.height < thumb.width
    by_key = {p["key"]: p for p in _predictions(runs["blur"])}
    sideways, first = by_key["DCIM/101MEDIA/SIDEWAYS.JPG"], by_key[f"DCIM/100MEDIA/{sample_photos()[0].name}"]
    assert [d["bbox"] for d in sideways["detections"]] == [d["bbox"] for d in first["detections"]]


@pytest.mark.parametrize("mode", ["blur", "box"])
def test_no_human_detection_reaches_embeddings_degraded_views_or_references(runs: dict[str, Path],
                                                                            mode: str) -> None:
    """Person boxes of any confidence and human labels have no embedding, hence no centroid or fit reference."""
    store = Store(runs[mode] / STORE_NAME)
    try:
        card = Path(store.get_meta("dump_root"))
        paths, dets, _ = store.embeddings(card)
        degraded = store.degraded(card)
    finally:
        store.close()
    embedded = set(zip(paths, dets.tolist()))
    assert embedded
    viewed = set(zip(degraded.filepaths, degraded.detections.tolist()))
    for prediction in _predictions(runs[mode]):
        for index, det in enumerate(prediction.get("detections") or []):
            if is_human(det):
                assert (prediction["filepath"], index) not in embedded, (prediction["key"], index, det)
                assert (prediction["filepath"], index) not in viewed


def test_is_human_reads_the_detector_speciesnet_and_pass_two() -> None:
    animal = {"category": "1", "conf": 0.9, "bbox": [0, 0, 1, 1]}
    assert not is_human(animal)
    assert is_human({**animal, "category": "2"})
    assert is_human({**animal, "processed_classification": {"class": Classification.HUMAN.value, "score": 0.9,
                                                             "source": "classifier"}})
    assert check_privacy("drop") == "drop"
    with pytest.raises(ValueError, match="blur, box, drop"):
        check_privacy("pixelate")
    assert flat_name("DCIM/100MEDIA/clip.MP4#frame=000030&fps=10") == "DCIM_100MEDIA_clip_frame000030"


def test_the_cli_refuses_an_unknown_privacy_mode(person_bundle: Path, card: Path, tmp_path: Path) -> None:
    proc = run_cli("run", str(card), "--bundle", str(person_bundle), "--out", str(tmp_path / "out"),
                   "--privacy", "pixelate", check=False)
    assert proc.returncode == 2 and "pixelate" in proc.stderr


def test_person_boxes_count_from_the_conservative_threshold() -> None:
    from trapedge.runtime.outputs.images import PERSON_FLOOR, is_human

    assert PERSON_FLOOR == 0.05
    assert is_human({"category": "2", "conf": 0.05, "bbox": [0, 0, 1, 1]})
    assert not is_human({"category": "2", "conf": 0.049, "bbox": [0, 0, 1, 1]})
    assert not is_human({"category": "1", "conf": 0.9, "bbox": [0, 0, 1, 1]})


def test_export_results_exports_images_under_the_same_rules(runs: dict[str, Path], tmp_path: Path) -> None:
    """A run made without --export-crops gets its images later, here with --privacy drop."""
    out = Path(shutil.copytree(runs["blur"], tmp_path / "later"))
    shutil.rmtree(out / THUMBNAILS)
    shutil.rmtree(out / CROPS)
    run_cli("export-results", str(out), "--format", "csv", "--export-crops", "--privacy", "drop")
    predictions = _predictions(out)
    with_people = {flat_name(p["key"]) for p in predictions if any(is_human(d) for d in p.get("detections") or [])}
    thumbnails = {p.stem for p in (out / THUMBNAILS).glob("*.jpg")}
    assert with_people and thumbnails and not thumbnails & with_people
    assert thumbnails == {p.stem for p in (runs["drop"] / THUMBNAILS).glob("*.jpg")}


def test_batch_honours_the_station_privacy_in_crops_and_both_reports(runs: dict[str, Path], person_bundle: Path,
                                                                     card: Path, tmp_path: Path) -> None:
    """`trapedge batch --export-crops` with `privacy = "drop"` in the station config: the card's exports equal
    `trapedge run --privacy drop`'s, and neither its report nor the season's shows a photo with a person."""
    cards = tmp_path / "cards"
    shutil.copytree(card, cards / "dep1")
    config = tmp_path / "station.toml"
    config.write_text('privacy = "drop"\n')
    root = tmp_path / "season"
    run_cli("batch", str(cards), "--bundle", str(person_bundle), "--out", str(root), "--parallel", "1",
            "--export-crops", "--config", str(config), "-q")
    for folder in (THUMBNAILS, CROPS):
        mine = {p.relative_to(root / "dep1" / folder).as_posix() for p in (root / "dep1" / folder).rglob("*.jpg")}
        theirs = {p.relative_to(runs["drop"] / folder).as_posix() for p in (runs["drop"] / folder).rglob("*.jpg")}
        assert mine == theirs and mine
    with_people = {p["key"] for p in _predictions(runs["drop"]) if any(is_human(d) for d in p["detections"] or [])}
    assert with_people
    for page, prefix in ((root / "dep1" / REPORT_NAME, ""), (root / REPORT_NAME, "dep1/")):
        shown = {html.unescape(k) for k in re.findall(r'data-key="([^"]+)"', page.read_text())}
        assert shown and not shown & {prefix + key for key in with_people}, page
