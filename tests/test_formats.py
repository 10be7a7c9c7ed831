"""Result formats read back by the ecosystem's own code: MegaDetector, SpeciesNet, Frictionless (Camtrap DP)."""

from __future__ import annotations

import copy
import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import pytest

from paths import CAMTRAP
from trapedge.runtime import atomic
from trapedge.runtime.speciesnet.ensemble import Classification
from trapedge.runtime.outputs import (
    DEPLOYMENT_COLUMNS, FLAT_COLUMNS, MEDIA_COLUMNS, OBSERVATION_COLUMNS, Deployment, ImageInfo, final_label,
    write_camtrap_dp, write_flat_csv, write_megadetector_json, write_predictions_json,
)

ROOT = "/card"
BLANK, ANIMAL, HUMAN = Classification.BLANK.value, Classification.ANIMAL.value, Classification.HUMAN.value
VEHICLE, UNKNOWN = Classification.VEHICLE.value, Classification.UNKNOWN.value
MAMMAL = "f2d233e3-80e3-433d-9687-e29ecc7a467a;mammalia;;;;;mammal"
FELIDAE = "1f6a7d5c-6bb1-4b3c-9a1c-6c1f0e0b1a01;mammalia;carnivora;felidae;;;cat family"
CANIDAE = "3184697f-51ad-4608-9a28-9edb5500159c;mammalia;carnivora;canidae;;;canine family"
LION = "ddf59264-185a-4d35-b647-2785792bdf54;mammalia;carnivora;felidae;panthera;leo;lion"
LEOPARD = "e2b9e0c4-9a8e-4b3e-8d6f-4b2f3c1d2a11;mammalia;carnivora;felidae;panthera;pardus;leopard"
JACKAL = "0a2f3b4c-5d6e-4f70-8a91-b2c3d4e5f601;mammalia;carnivora;canidae;lupulella;mesomelas;black-backed jackal"
BIRD = "b1352069-a39c-4a84-a949-60044271c0c1;aves;;;;;bird"
OSTRICH = "7c8d9e0f-1a2b-4c3d-8e4f-5a6b7c8d9e02;aves;struthioniformes;struthionidae;struthio;camelus;common ostrich"
DETECTOR_LABELS = {"1": "animal", "2": "human", "3": "vehicle"}
FAILED_MTIME_NS = int(datetime(2021, 5, 31, 6, 30, tzinfo=timezone.utc).timestamp()) * 10**9


def _det(category: str, conf: float, label: Optional[str] = None, score: float = 0.0, source: str = "classifier",
         rec: Optional[dict] = None, bbox: tuple = (0.1, 0.2, 0.3, 0.4)) -> dict:
    det = {"category": category, "label": DETECTOR_LABELS[category], "conf": conf, "bbox": list(bbox)}
    if label is not None:
        det["raw_classifications"] = {"classes": [label], "scores": [score]}
        det["processed_classification"] = {"class": label, "score": score, "source": source}
    if rec is not None:
        det["reclassification"] = rec
    return det


def _score(label: str, original: str, level: str, scoring: str = "cosine", **extra) -> dict:
    return {"class": label, "level": level, "stage": "score", "distance": 0.05, "threshold": 0.2,
            "runner_up": None, "margin": None, "original": original, "scoring": scoring, **extra}


def fabricated() -> tuple[list[dict], dict[str, ImageInfo]]:
    """Predictions in SpeciesNet 5.x form touched by every stage, with a failure, an empty image, people and cars."""
    images = [
        ("100RECNX/IMG_0001.JPG", "2021-05-31T08:25:38", [
            _det("1", 0.92, FELIDAE, 0.81, "classifier+rollup_to_family", _score(LION, FELIDAE, "species")),
            _det("1", 0.05)]),
        ("100RECNX/IMG_0002.JPG", "2021-01-15T23:30:00", [
            _det("1", 0.9, LEOPARD, 0.95, rec={"class": LEOPARD, "level": "species", "stage": "accept",
                                               "score": 0.95, "threshold": 0.8, "original": LEOPARD})]),
        ("100RECNX/IMG_0003.JPG", "2021-05-31T08:26:00", [
            _det("1", 0.5, BLANK, 0.7, rec={"class": BIRD, "level": "class", "stage": "birds", "original": BLANK,
                                            "aves_score": 0.62, "aves_threshold": 0.5, "bird_prompt": None,
                                            "bird_prompt_threshold": None}),
            _det("1", 0.4, BLANK, 0.6, rec=_score(OSTRICH, BLANK, "species", "mahalanobis", via="birds"),
                 bbox=(0.5, 0.5, 0.2, 0.00001))]),
        ("100RECNX/IMG_0004.JPG", "2021-05-31T09:00:00", [
            _det("2", 0.88, HUMAN, 0.88, "detector"), _det("3", 0.77, VEHICLE, 0.77, "detector")]),
        ("100RECNX/IMG_0005.JPG", "2021-05-31T09:10:00", [
            _det("1", 0.3, BLANK, 0.6), _det("1", 0.2, UNKNOWN, 0.4)]),
        ("101RECNX/IMG_0006.JPG", "2021-05-31T10:00:00", []),
        ("101RECNX/IMG_0007.JPG", None, None),
        ("101RECNX/IMG_0008.JPG", None, [
            _det("1", 0.7, MAMMAL, 0.7, "classifier+rollup_to_class", _score(CANIDAE, MAMMAL, "family")),
            _det("1", 0.55, ANIMAL, 0.55, "detector", _score(JACKAL, ANIMAL, "species"))]),
    ]
    predictions, infos = [], {}
    for key, captured, detections in images:
        filepath = f"{ROOT}/{key}"
        pred: dict = {"filepath": filepath}
        if detections is None:
            pred.update(failures=["DETECTOR"], failure_reason="cannot decode: OSError: truncated")
            infos[filepath] = ImageInfo(key, filepath, status="failed", reason="cannot decode: OSError: truncated",
                                        modified_ns=FAILED_MTIME_NS)
        else:
            pred.update(country="NAM", detections=detections)
            warned = key.endswith("0008.JPG")
            infos[filepath] = ImageInfo(key, filepath, 2048, 1440, captured, "warning" if warned else "ok",
                                        "truncated JPEG" if warned else "")
        pred["model_version"] = "4.0.3a"
        predictions.append(pred)
    return predictions, infos


def _dets(predictions: list[dict], key: str) -> list[dict]:
    return next(p for p in predictions if p["filepath"] == f"{ROOT}/{key}")["detections"]


def _deployment(tz: str = "Africa/Windhoek", **extra) -> Deployment:
    return Deployment("etosha-01", -19.1, 15.9, tz, location_name="Okaukuejo waterhole", camera_model="Reconyx HF2X",
                      **extra)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fp:
        return list(csv.DictReader(fp))


def test_final_label_follows_the_stage_that_relabelled() -> None:
    predictions, _ = fabricated()
    first, low = _dets(predictions, "100RECNX/IMG_0001.JPG")
    assert final_label(first) == (LION, 0.81, "trapedge stage 5 (cosine)")
    assert final_label(low) == (ANIMAL, 0.05, "megadetector")
    assert final_label(_dets(predictions, "100RECNX/IMG_0002.JPG")[0]) == (LEOPARD, 0.95, "speciesnet classifier")
    bird, ostrich = _dets(predictions, "100RECNX/IMG_0003.JPG")
    assert final_label(bird) == (BIRD, 0.62, "trapedge stage 2 (birds)")
    assert final_label(ostrich) == (OSTRICH, 0.4, "trapedge stage 2 (birds) + stage 5 (mahalanobis)")
    person, car = _dets(predictions, "100RECNX/IMG_0004.JPG")
    assert final_label(person) == (HUMAN, 0.88, "speciesnet detector")
    assert final_label(car)[0] == VEHICLE
    family, jackal = _dets(predictions, "101RECNX/IMG_0008.JPG")
    assert final_label(family) == (CANIDAE, 0.7, "trapedge stage 5 (cosine)")
    assert final_label(jackal) == (JACKAL, 0.55, "trapedge stage 5 (cosine)")


def test_every_file_goes_through_atomic_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    predictions, images = fabricated()
    written = []
    real = atomic.atomic_write_bytes
    monkeypatch.setattr(atomic, "atomic_write_bytes", lambda path, data: (written.append(Path(path)),
                                                                          real(path, data)))
    write_megadetector_json(tmp_path / "md.json", predictions, images, info={})
    write_camtrap_dp(tmp_path / "dp", predictions, images, _deployment(), info={})
    write_flat_csv(tmp_path / "flat.csv", predictions, images)
    on_disk = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert on_disk == set(written) and len(on_disk) == 6
    assert not [p for p in tmp_path.rglob(".*")]


def test_writers_refuse_a_prediction_without_image_info(tmp_path: Path) -> None:
    predictions, images = fabricated()
    images.pop(predictions[0]["filepath"])
    with pytest.raises(ValueError, match="no ImageInfo"):
        write_flat_csv(tmp_path / "flat.csv", predictions, images)


def test_deployment_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="timezone"):
        _deployment("Mars/Olympus_Mons")
    with pytest.raises(ValueError, match="latitude"):
        Deployment("d", 91.0, 0.0, "UTC")
    with pytest.raises(ValueError, match="feature_type"):
        _deployment(feature_type="highway")
    with pytest.raises(ValueError, match="unknown deployment fields: colour"):
        Deployment.from_dict({"deployment_id": "d", "latitude": 0, "longitude": 0, "timezone": "UTC",
                              "colour": "green"})


# MegaDetector batch output


def _md(tmp_path: Path) -> tuple[Path, list[dict], dict]:
    predictions, images = fabricated()
    path = tmp_path / "md.json"
    info = {"trapedge": {"version": "0.1.0", "reclassification": {"counts": {"score": 4}}}}
    write_megadetector_json(path, predictions, images, info=info)
    return path, predictions, json.loads(path.read_text())


def test_megadetector_file_passes_megadetectors_validator_and_loader(tmp_path: Path) -> None:
    pytest.importorskip("megadetector")
    from megadetector.postprocessing.load_api_results import load_api_results
    from megadetector.postprocessing.validate_batch_results import (
        ValidateBatchResultsOptions, validate_batch_results,
    )

    path, _, document = _md(tmp_path)
    options = ValidateBatchResultsOptions()
    options.raise_errors = True
    results = validate_batch_results(str(path), options)["validation_results"]
    assert results["errors"] == [] and results["warnings"] == []
    assert results["detection_category_id_to_count"] == {"1": 9, "2": 1, "3": 1}
    table, other = load_api_results(str(path))
    assert sorted(table["file"]) == sorted(im["file"] for im in document["images"])
    assert other["info"]["format_version"] == "1.6" and other["info"]["trapedge"]["version"] == "0.1.0"
    assert other["info"]["classifier_metadata"]["reclassified_by_stage"] == {"birds": 1, "score": 4, "calibrated": 0,
                                                                        "smoothing": 0}
    failed = [im for im in document["images"] if "failure" in im]
    assert [im["file"] for im in failed] == ["101RECNX/IMG_0007.JPG"] and failed[0]["detections"] is None
    empty = next(im for im in document["images"] if im["file"] == "101RECNX/IMG_0006.JPG")
    assert empty["detections"] == []
    descriptions = document["classification_category_descriptions"]
    assert set(descriptions) == set(document["classification_categories"])
    assert all(d.count(";") == 6 for d in descriptions.values())
    assert {document["classification_categories"][i] for i in descriptions} >= {"lion", "bird", "human", "vehicle"}


def test_megadetector_file_agrees_with_megadetectors_own_speciesnet_converter(tmp_path: Path) -> None:
    pytest.importorskip("megadetector")
    from megadetector.utils.wi_taxonomy_utils import generate_md_results_from_predictions_json

    _, predictions, ours = _md(tmp_path)
    write_predictions_json(tmp_path / "predictions.json", copy.deepcopy(predictions))
    theirs = generate_md_results_from_predictions_json(str(tmp_path / "predictions.json"), base_folder=ROOT)
    assert [im["file"] for im in ours["images"]] == [im["file"] for im in theirs["images"]]
    by_file = {f"{ROOT}/{im['file']}": im for im in ours["images"]}
    for pred, other in zip(sorted(predictions, key=lambda p: p["filepath"]), theirs["images"]):
        mine = by_file[pred["filepath"]]
        assert ("failure" in mine) == ("failure" in other)
        assert len(mine["detections"] or []) == len(other["detections"] or []) == len(pred.get("detections") or [])
        for det, a, b in zip(pred.get("detections") or [], mine["detections"] or [], other["detections"] or []):
            assert (a["category"], a["conf"], a["bbox"]) == (b["category"], b["conf"], b["bbox"])
            assert ("classifications" in a) == ("classifications" in b)
            if "classifications" not in a:
                continue
            got = ours["classification_category_descriptions"][a["classifications"][0][0]]
            speciesnet = theirs["classification_category_descriptions"][b["classifications"][0][0]]
            rec = det.get("reclassification")
            if rec and rec["stage"] in ("birds", "score"):
                assert got == rec["class"] and a["reclassification"] == rec and speciesnet == rec["original"]
            else:
                assert got == speciesnet and a["classifications"][0][1] == b["classifications"][0][1]


def test_megadetector_smoothing_reads_our_taxonomy_strings(tmp_path: Path) -> None:
    pytest.importorskip("megadetector")
    from megadetector.postprocessing.classification_postprocessing import smooth_classification_results_image_level

    path, _, document = _md(tmp_path)
    smoothed = smooth_classification_results_image_level(str(path))
    assert len(smoothed["images"]) == len(document["images"])


def test_whole_image_pseudo_detection_is_left_out_of_megadetector_and_unboxed_in_camtrap(tmp_path: Path) -> None:
    pytest.importorskip("megadetector")
    from megadetector.postprocessing.validate_batch_results import (
        ValidateBatchResultsOptions, validate_batch_results,
    )

    whole = {"category": "0", "label": "whole_image_classification", "conf": 1.0, "bbox": [0.0, 0.0, 1.0, 1.0],
             "processed_classification": {"class": LION, "score": 0.9, "source": "classifier"}}
    predictions = [{"filepath": f"{ROOT}/a.jpg", "detections": [whole], "model_version": "4.0.3b"}]
    images = {f"{ROOT}/a.jpg": ImageInfo("a.jpg", f"{ROOT}/a.jpg", captured="2021-05-31T08:00:00")}
    write_megadetector_json(tmp_path / "md.json", predictions, images, info={})
    options = ValidateBatchResultsOptions()
    options.raise_errors = True
    assert validate_batch_results(str(tmp_path / "md.json"), options)["validation_results"]["errors"] == []
    assert json.loads((tmp_path / "md.json").read_text())["images"][0]["detections"] == []
    write_camtrap_dp(tmp_path / "dp", predictions, images, _deployment(), info={})
    (row,) = _read_csv(tmp_path / "dp" / "observations.csv")
    assert (row["scientificName"], row["bboxX"], row["bboxWidth"]) == ("Panthera leo", "", "")


# SpeciesNet predictions.json


def test_speciesnet_resume_reads_our_predictions_with_reclassifications(tmp_path: Path) -> None:
    speciesnet_utils = pytest.importorskip("speciesnet.utils")
    predictions, _ = fabricated()
    path = tmp_path / "predictions.json"
    write_predictions_json(path, copy.deepcopy(predictions), {"trapedge": {"version": "0.1.0"}})
    instances = [{"filepath": p["filepath"]} for p in predictions]
    partial, todo = speciesnet_utils.load_partial_predictions(path, instances)
    failed = {p["filepath"] for p in predictions if "failures" in p}
    assert set(partial) == {p["filepath"] for p in predictions} - failed
    assert [i["filepath"] for i in todo] == sorted(failed)
    lion = partial[f"{ROOT}/100RECNX/IMG_0001.JPG"]["detections"][0]
    assert lion["reclassification"]["class"] == LION and lion["processed_classification"]["class"] == FELIDAE


# Camtrap DP


def _offline_session(served: list[str]):
    """A requests session answering the Camtrap DP 1.0.2 URLs from tests/data/ and the rest of the profile's $refs."""
    import requests
    from requests.adapters import BaseAdapter

    import frictionless

    base = "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/"
    files = {base + name: (CAMTRAP / name).read_bytes() for name in (
        "camtrap-dp-profile.json", "deployments-table-schema.json", "media-table-schema.json",
        "observations-table-schema.json")}
    files["http://json.schemastore.org/geojson.json"] = (
        Path(frictionless.__file__).parent / "assets" / "profiles" / "geojson.json").read_bytes()
    # The Data Package base profile: frictionless checks the Data Package standard itself, offline.
    files["https://specs.frictionlessdata.io/schemas/data-package.json"] = b"{}"

    class Local(BaseAdapter):
        def send(self, request, **kwargs):
            served.append(request.url)
            response = requests.Response()
            response.url, response.request = request.url, request
            body = files.get(request.url)
            response.status_code = 200 if body is not None else 404
            response.raw = io.BytesIO(body or b"")
            return response

        def close(self) -> None:
            pass

    session = requests.Session()
    session.mount("http://", Local())
    session.mount("https://", Local())
    return session


def _validate(descriptor: Path) -> tuple[list, list[str]]:
    frictionless = pytest.importorskip("frictionless")
    if not CAMTRAP.is_dir():
        pytest.skip(f"Camtrap DP 1.0.2 schemas not found at {CAMTRAP}")
    served: list[str] = []
    with frictionless.system.use_context(http_session=_offline_session(served)):
        report = frictionless.validate(str(descriptor))
    return report.flatten(["type", "note"]), served


def test_offline_validator_accepts_the_official_example_and_rejects_a_broken_package(tmp_path: Path) -> None:
    errors, served = _validate(CAMTRAP / "example" / "datapackage.json")
    assert errors == []
    assert "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/observations-table-schema.json" in served
    predictions, images = fabricated()
    write_camtrap_dp(tmp_path, predictions, images, _deployment(), info={})
    media = _read_csv(tmp_path / "media.csv")
    media[0]["timestamp"] = "2021-05-31T08:25:38"
    media[1]["deploymentID"] = "elsewhere"
    with open(tmp_path / "media.csv", "w", newline="", encoding="utf-8") as fp:
        writer = csv.DictWriter(fp, fieldnames=MEDIA_COLUMNS)
        writer.writeheader()
        writer.writerows(media)
    errors, _ = _validate(tmp_path / "datapackage.json")
    assert {kind for kind, _ in errors} == {"type-error", "foreign-key"}
    package = json.loads((tmp_path / "datapackage.json").read_text())
    package["project"]["samplingDesign"] = "haphazard"
    (tmp_path / "datapackage.json").write_text(json.dumps(package))
    errors, _ = _validate(tmp_path / "datapackage.json")
    assert [kind for kind, _ in errors] == ["package-error"] and "haphazard" in errors[0][1]


def test_camtrap_dp_package_validates_against_the_official_profile_and_schemas(tmp_path: Path) -> None:
    predictions, images = fabricated()
    info = {"title": "Etosha pilot", "contributors": [{"title": "A. Ranger", "role": "contact"}],
            "project": {"title": "Etosha waterholes", "samplingDesign": "targeted"},
            "licenses": [{"name": "CC0-1.0", "scope": "data"}, {"name": "CC-BY-4.0", "scope": "media"}],
            "created": "2021-06-01T12:00:00Z", "trapedge": {"version": "0.1.0"}}
    write_camtrap_dp(tmp_path / "dp", predictions, images, _deployment(), info=info)
    errors, served = _validate(tmp_path / "dp" / "datapackage.json")
    assert errors == []
    assert "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/camtrap-dp-profile.json" in served
    package = json.loads((tmp_path / "dp" / "datapackage.json").read_text())
    assert package["profile"] == "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/camtrap-dp-profile.json"
    assert {r["name"]: r["schema"] for r in package["resources"]} == {
        n: f"https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/{n}-table-schema.json"
        for n in ("deployments", "media", "observations")}
    assert package["project"]["samplingDesign"] == "targeted" and package["project"]["observationLevel"] == ["media"]
    assert package["contributors"][0]["title"] == "A. Ranger" and package["trapedge"] == {"version": "0.1.0"}
    assert package["created"] == "2021-06-01T12:00:00Z"
    assert package["temporal"] == {"start": "2021-01-15", "end": "2021-05-31"}
    for name, columns in (("deployments", DEPLOYMENT_COLUMNS), ("media", MEDIA_COLUMNS),
                          ("observations", OBSERVATION_COLUMNS)):
        schema = json.loads((CAMTRAP / f"{name}-table-schema.json").read_text())
        assert columns == [f["name"] for f in schema["fields"]]
        with open(tmp_path / "dp" / f"{name}.csv", newline="", encoding="utf-8") as fp:
            assert next(csv.reader(fp)) == columns


@pytest.mark.parametrize("tz, january, may, failed", [
    ("Africa/Windhoek", "2021-01-15T23:30:00+02:00", "2021-05-31T08:25:38+02:00", "2021-05-31T08:30:00+02:00"),
    ("America/New_York", "2021-01-15T23:30:00-05:00", "2021-05-31T08:25:38-04:00", "2021-05-31T02:30:00-04:00"),
    ("UTC", "2021-01-15T23:30:00+00:00", "2021-05-31T08:25:38+00:00", "2021-05-31T06:30:00+00:00"),
])
def test_camtrap_dp_timestamps_are_camera_local_with_the_zone_offset(tmp_path: Path, tz: str, january: str,
                                                                    may: str, failed: str) -> None:
    predictions, images = fabricated()
    write_camtrap_dp(tmp_path, predictions, images, _deployment(tz), info={"created": "2021-06-01T12:00:00Z"})
    media = {row["mediaID"]: row for row in _read_csv(tmp_path / "media.csv")}
    assert media["100RECNX/IMG_0002.JPG"]["timestamp"] == january
    assert media["100RECNX/IMG_0001.JPG"]["timestamp"] == may
    assert media["101RECNX/IMG_0007.JPG"]["timestamp"] == failed
    assert "file modification time" in media["101RECNX/IMG_0007.JPG"]["mediaComments"]
    assert media["101RECNX/IMG_0008.JPG"]["timestamp"] == january
    assert "placeholder" in media["101RECNX/IMG_0008.JPG"]["mediaComments"]
    (deployment,) = _read_csv(tmp_path / "deployments.csv")
    assert deployment["deploymentStart"] == january and deployment["timestampIssues"] == "true"
    assert deployment["deploymentEnd"] == max((r["timestamp"] for r in media.values()),
                                              key=datetime.fromisoformat)
    for row in _read_csv(tmp_path / "observations.csv"):
        assert row["eventStart"] == row["eventEnd"] == media[row["mediaID"]]["timestamp"]
        assert datetime.fromisoformat(row["classificationTimestamp"]).utcoffset() is not None
    for row in media.values():
        assert datetime.fromisoformat(row["timestamp"]).utcoffset() is not None


def test_camtrap_dp_deployment_window_and_fallback_come_from_the_deployment(tmp_path: Path) -> None:
    predictions, images = fabricated()
    deployment = _deployment(start="2021-01-10T12:00:00", end="2021-06-01T09:00:00+02:00")
    write_camtrap_dp(tmp_path, predictions, images, deployment, info={})
    (row,) = _read_csv(tmp_path / "deployments.csv")
    assert (row["deploymentStart"], row["deploymentEnd"]) == ("2021-01-10T12:00:00+02:00", "2021-06-01T09:00:00+02:00")
    media = {r["mediaID"]: r for r in _read_csv(tmp_path / "media.csv")}
    assert media["101RECNX/IMG_0008.JPG"]["timestamp"] == "2021-01-10T12:00:00+02:00"


def test_camtrap_dp_observations_reference_media_and_carry_provenance(tmp_path: Path) -> None:
    predictions, images = fabricated()
    write_camtrap_dp(tmp_path, predictions, images, _deployment(), info={})
    deployments = {r["deploymentID"] for r in _read_csv(tmp_path / "deployments.csv")}
    media = {r["mediaID"]: r for r in _read_csv(tmp_path / "media.csv")}
    observations = _read_csv(tmp_path / "observations.csv")
    assert set(media) == {info.key for info in images.values()}
    assert all(r["deploymentID"] in deployments for r in list(media.values()) + observations)
    assert all(r["mediaID"] in media and r["observationLevel"] == "media" for r in observations)
    assert len({r["observationID"] for r in observations}) == len(observations)
    by_media: dict[str, list[dict]] = {}
    for r in observations:
        by_media.setdefault(r["mediaID"], []).append(r)
    assert "101RECNX/IMG_0007.JPG" not in by_media
    assert media["101RECNX/IMG_0007.JPG"]["mediaComments"].startswith("failed: cannot decode")
    assert [r["observationType"] for r in by_media["101RECNX/IMG_0006.JPG"]] == ["blank"]
    assert by_media["101RECNX/IMG_0006.JPG"][0]["bboxX"] == ""
    assert [r["observationID"] for r in by_media["100RECNX/IMG_0001.JPG"]] == ["100RECNX/IMG_0001.JPG#0"]
    lion = by_media["100RECNX/IMG_0001.JPG"][0]
    assert (lion["observationType"], lion["scientificName"], lion["count"]) == ("animal", "Panthera leo", "1")
    assert (lion["bboxX"], lion["bboxY"], lion["bboxWidth"], lion["bboxHeight"]) == ("0.1", "0.2", "0.3", "0.4")
    assert lion["classificationMethod"] == "machine" and lion["classificationProbability"] == "0.81"
    assert lion["classifiedBy"] == "SpeciesNet 4.0.3a + trapedge 0.1.0 stage 5 (cosine)"
    leopard = by_media["100RECNX/IMG_0002.JPG"][0]
    assert (leopard["scientificName"], leopard["classifiedBy"]) == ("Panthera pardus", "SpeciesNet 4.0.3a")
    bird, ostrich = by_media["100RECNX/IMG_0003.JPG"]
    assert bird["scientificName"] == "Aves" and bird["classifiedBy"].endswith("stage 2 (birds)")
    assert ostrich["scientificName"] == "Struthio camelus" and float(ostrich["bboxHeight"]) > 0
    assert ostrich["classifiedBy"].endswith("stage 2 (birds) + stage 5 (mahalanobis)")
    person, car = by_media["100RECNX/IMG_0004.JPG"]
    assert (person["observationType"], person["scientificName"]) == ("human", "Homo sapiens")
    assert (car["observationType"], car["scientificName"], car["count"]) == ("vehicle", "", "")
    assert [r["observationType"] for r in by_media["100RECNX/IMG_0005.JPG"]] == ["blank", "unknown"]
    family, jackal = by_media["101RECNX/IMG_0008.JPG"]
    assert (family["scientificName"], jackal["scientificName"]) == ("Canidae", "Lupulella mesomelas")
    package = json.loads((tmp_path / "datapackage.json").read_text())
    names = {r["scientificName"] for r in observations if r["scientificName"]}
    assert {t["scientificName"] for t in package["taxonomic"]} == names
    ranks = {t["scientificName"]: t["taxonRank"] for t in package["taxonomic"]}
    assert ranks == {"Aves": "class", "Canidae": "family", "Homo sapiens": "species", "Lupulella mesomelas": "species",
                     "Panthera leo": "species", "Panthera pardus": "species", "Struthio camelus": "species"}
    lion_taxon = next(t for t in package["taxonomic"] if t["scientificName"] == "Panthera leo")
    assert lion_taxon["vernacularNames"] == {"eng": "lion"} and lion_taxon["family"] == "Felidae"


# Flat CSV


def test_flat_csv_round_trips_every_detection(tmp_path: Path) -> None:
    predictions, images = fabricated()
    write_flat_csv(tmp_path / "flat.csv", predictions, images)
    with open(tmp_path / "flat.csv", newline="", encoding="utf-8") as fp:
        reader = csv.DictReader(fp)
        assert reader.fieldnames == FLAT_COLUMNS
        rows = list(reader)
    expected = []
    for pred in sorted(predictions, key=lambda p: p["filepath"]):
        info = images[pred["filepath"]]
        for idx, det in enumerate(pred.get("detections") or [None]):
            expected.append((info.key, pred["filepath"], info.captured or "", idx if det else None, det))
    assert len(rows) == len(expected)
    for row, (key, filepath, captured, idx, det) in zip(rows, expected):
        assert (row["key"], row["filepath"], row["captured"]) == (key, filepath, captured)
        if det is None:
            assert row["detection"] == "" and row["final_class"] == ""
            continue
        assert int(row["detection"]) == idx and row["category"] == det["category"]
        assert float(row["conf"]) == det["conf"]
        assert [float(row[c]) for c in ("bbox_x", "bbox_y", "bbox_width", "bbox_height")] == pytest.approx(
            det["bbox"], abs=1e-4)
        processed = det.get("processed_classification", {})
        assert row["speciesnet_class"] == processed.get("class", "")
        assert row["speciesnet_source"] == processed.get("source", "")
        label, probability, method = final_label(det)
        assert (row["final_class"], float(row["final_probability"]), row["final_method"]) == (
            label, probability, method)
        assert row["common_name"] == label.split(";")[-1]
    failed = next(r for r in rows if r["key"] == "101RECNX/IMG_0007.JPG")
    assert failed["status"] == "failed" and failed["reason"].startswith("cannot decode")
    levels = {r["final_class"]: (r["final_level"], r["final_stage"]) for r in rows if r["final_class"]}
    assert levels[LION] == ("species", "score") and levels[BIRD] == ("class", "birds")
    assert levels[CANIDAE] == ("family", "score") and levels[LEOPARD] == ("species", "speciesnet")
    assert levels[VEHICLE] == ("", "speciesnet") and levels[UNKNOWN] == ("", "speciesnet")
    assert levels[ANIMAL] == ("kingdom", "detector")


def test_atomic_writes_are_readable_by_others(tmp_path: Path) -> None:
    import os

    from trapedge.runtime.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o644


def test_deployment_timezone_takes_iana_names_and_utc_offsets() -> None:
    from datetime import datetime

    from trapedge.runtime.outputs import Deployment, parse_zone

    when = datetime(2024, 5, 1, 12, 0, 0)
    assert when.replace(tzinfo=parse_zone("+02:00")).isoformat().endswith("+02:00")
    assert when.replace(tzinfo=parse_zone("-0530")).isoformat().endswith("-05:30")
    assert when.replace(tzinfo=parse_zone("Africa/Windhoek")).utcoffset().total_seconds() == 7200
    assert Deployment.from_dict({"deployment_id": "d", "latitude": 0.0, "longitude": 0.0,
                                 "timezone": "UTC+3"}).zone.utcoffset(when).total_seconds() == 10800
    for bad in ("+15:00", "Mars/Base", "+02:75"):
        with pytest.raises(ValueError):
            parse_zone(bad)
