"""Camtrap DP 1.0.2 packages: one media-level machine observation per box, timestamps in the deployment's zone."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone, tzinfo
from pathlib import Path, PurePosixPath
from typing import Optional

from .. import __version__
from ..atomic import atomic_write_text
from ..speciesnet.ensemble import Classification
from .deployment import Deployment, parse_time
from .flat_csv import csv_text
from .speciesnet_json import DECIMALS, ImageInfo, image_failed, model_versions, pair_images
from .taxa import WHOLE_IMAGE, Final, final, observation_type, taxon
from .video import MEDIATYPES as VIDEO_MEDIATYPES, video_event

__all__ = [
    "CAMTRAP_DP_PROFILE",
    "CAMTRAP_DP_SCHEMAS",
    "CAMTRAP_DP_VERSION",
    "DEPLOYMENT_COLUMNS",
    "MEDIA_COLUMNS",
    "OBSERVATION_COLUMNS",
    "SAMPLING_DESIGNS",
    "merge_camtrap_dp",
    "write_camtrap_dp",
]

CAMTRAP_DP_VERSION = "1.0.2"
_CAMTRAP_DP_BASE = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{CAMTRAP_DP_VERSION}"
CAMTRAP_DP_PROFILE = f"{_CAMTRAP_DP_BASE}/camtrap-dp-profile.json"
CAMTRAP_DP_SCHEMAS = {name: f"{_CAMTRAP_DP_BASE}/{name}-table-schema.json"
                      for name in ("deployments", "media", "observations")}

DEPLOYMENT_COLUMNS = [
    "deploymentID", "locationID", "locationName", "latitude", "longitude", "coordinateUncertainty",
    "deploymentStart", "deploymentEnd", "setupBy", "cameraID", "cameraModel", "cameraDelay", "cameraHeight",
    "cameraDepth", "cameraTilt", "cameraHeading", "detectionDistance", "timestampIssues", "baitUse",
    "featureType", "habitat", "deploymentGroups", "deploymentTags", "deploymentComments",
]
MEDIA_COLUMNS = [
    "mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic", "fileName",
    "fileMediatype", "exifData", "favorite", "mediaComments",
]
OBSERVATION_COLUMNS = [
    "observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd", "observationLevel",
    "observationType", "cameraSetupType", "scientificName", "count", "lifeStage", "sex", "behavior",
    "individualID", "individualPositionRadius", "individualPositionAngle", "individualSpeed", "bboxX", "bboxY",
    "bboxWidth", "bboxHeight", "classificationMethod", "classifiedBy", "classificationTimestamp",
    "classificationProbability", "observationTags", "observationComments",
]
SAMPLING_DESIGNS = ("simpleRandom", "systematicRandom", "clusteredRandom", "experimental", "targeted",
                    "opportunistic")
_MEDIATYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".tif": "image/tiff",
               ".tiff": "image/tiff", ".webp": "image/webp", **VIDEO_MEDIATYPES}
_BBOX_FLOOR = 10.0 ** -DECIMALS


def _localise(value: str, zone: tzinfo, what: str) -> datetime:
    moment = parse_time(value, what)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)


def _iso(moment: datetime) -> str:
    return moment.replace(microsecond=0).isoformat()


def _media_times(pairs: list[tuple[dict, ImageInfo]], deployment: Deployment,
                 created: datetime) -> tuple[dict[str, datetime], dict[str, str]]:
    """Each image's timestamp (EXIF, else file mtime, else deployment start, earliest known, run time) and why."""
    zone = deployment.zone
    times: dict[str, datetime] = {}
    notes: dict[str, str] = {}
    fallback = _localise(deployment.start, zone, "deployment start") if deployment.start else None
    for _, image in pairs:
        if image.captured:
            times[image.key] = _localise(image.captured, zone, f"{image.key}: captured")
        elif image.modified_ns is not None:
            times[image.key] = datetime.fromtimestamp(image.modified_ns / 1e9, tz=zone)
            notes[image.key] = "no EXIF capture time; timestamp is the file modification time"
    known = sorted(times.values())
    for _, image in pairs:
        if image.key not in times:
            times[image.key] = fallback or (known[0] if known else created.astimezone(zone))
            notes[image.key] = "no EXIF capture time nor file time; timestamp is a placeholder"
    return times, notes


def _deployment_row(deployment: Deployment, start: datetime, end: datetime, issues: bool) -> dict:
    d = deployment
    return {
        "deploymentID": d.deployment_id, "locationID": d.location_id, "locationName": d.location_name,
        "latitude": d.latitude, "longitude": d.longitude, "coordinateUncertainty": d.coordinate_uncertainty,
        "deploymentStart": _iso(start), "deploymentEnd": _iso(end), "setupBy": d.setup_by,
        "cameraID": d.camera_id, "cameraModel": d.camera_model, "cameraDelay": d.camera_delay,
        "cameraHeight": d.camera_height, "cameraDepth": d.camera_depth, "cameraTilt": d.camera_tilt,
        "cameraHeading": d.camera_heading, "detectionDistance": d.detection_distance,
        "timestampIssues": d.timestamp_issues or issues, "baitUse": d.bait_use, "featureType": d.feature_type,
        "habitat": d.habitat, "deploymentGroups": d.groups, "deploymentTags": d.tags,
        "deploymentComments": d.comments,
    }


def _bbox(det: dict) -> dict:
    x, y, w, h = (round(float(v), DECIMALS) for v in det["bbox"])
    return {"bboxX": min(max(x, 0.0), 1.0), "bboxY": min(max(y, 0.0), 1.0),
            "bboxWidth": min(max(w, _BBOX_FLOOR), 1.0), "bboxHeight": min(max(h, _BBOX_FLOOR), 1.0)}


def _classified_by(decision: Final, model_version: str) -> str:
    if decision.method.startswith("trapedge "):
        return f"SpeciesNet {model_version} + trapedge {__version__} {decision.method[len('trapedge '):]}"
    if decision.method == "megadetector":
        return f"SpeciesNet {model_version} (MegaDetector only)"
    return f"SpeciesNet {model_version}"


def _package_name(text: str) -> str:
    return re.sub(r"[^-a-z0-9._]+", "-", text.lower()).strip("-") or "trapedge"


def _created(info: dict) -> datetime:
    moment = parse_time(info["created"], "created") if info.get("created") else datetime.now(timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).replace(microsecond=0)


def _media_row(image: ImageInfo, deployment: Deployment, stamp: str, note: Optional[str]) -> dict:
    comments = [c for c in (f"{image.status}: {image.reason}" if image.reason else None, note) if c]
    name = PurePosixPath(image.key)
    return {"mediaID": image.key, "deploymentID": deployment.deployment_id,
            "captureMethod": deployment.capture_method, "timestamp": stamp, "filePath": image.key,
            "filePublic": False, "fileName": name.name,
            "fileMediatype": _MEDIATYPES.get(name.suffix.lower(), "image/jpeg"),
            "mediaComments": "; ".join(comments) or None}


def _observation_rows(pred: dict, image: ImageInfo, deployment: Deployment, stamp: str, created: datetime,
                      threshold: float, taxa: dict[str, dict]) -> list[dict]:
    """Media-level observations of one image (one per box at or above the threshold, else one blank); adds to taxa."""
    model_version = str(pred.get("model_version", "unknown"))
    base = {"deploymentID": deployment.deployment_id, "mediaID": image.key, "eventStart": stamp,
            "eventEnd": stamp, "observationLevel": "media", "classificationMethod": "machine",
            "classificationTimestamp": _iso(created)}
    kept = [(i, det) for i, det in enumerate(pred.get("detections") or [])
            if float(det.get("conf", 0.0)) >= threshold]
    if not kept:
        return [{**base, "observationID": f"{image.key}#blank", "observationType": "blank",
                 "classifiedBy": f"SpeciesNet {model_version} (MegaDetector only)"}]
    rows = []
    for idx, det in kept:
        decision = final(det)
        category = str(det.get("category"))
        kind = observation_type(decision.label, category)
        entry = None
        if kind in ("animal", "human"):
            entry = taxon(decision.label) or taxon(Classification.HUMAN.value if kind == "human"
                                                   else Classification.ANIMAL.value)
        row = {**base, "observationID": f"{image.key}#{idx}", "observationType": kind,
               "scientificName": entry["scientificName"] if entry else None,
               "count": 1 if entry else None, "classifiedBy": _classified_by(decision, model_version),
               "classificationProbability": decision.probability}
        if category != WHOLE_IMAGE and det.get("bbox"):
            row.update(_bbox(det))
        rows.append(row)
        if entry:
            taxa.setdefault(entry["scientificName"], entry)
    return rows


def write_camtrap_dp(folder: Path, predictions: list[dict], images: dict[str, ImageInfo],
                     deployment: Deployment, *, info: dict, detection_threshold: float = 0.1) -> None:
    """Writes a Camtrap DP 1.0.2 package: one media-level observation per box, timestamps in the deployment's zone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = pair_images(predictions, images)
    created = _created(info)
    zone = deployment.zone
    times, notes = _media_times(pairs, deployment, created)
    ordered = sorted(times.values())
    start = (_localise(deployment.start, zone, "deployment start") if deployment.start
             else ordered[0] if ordered else created.astimezone(zone))
    end = max(_localise(deployment.end, zone, "deployment end") if deployment.end
              else ordered[-1] if ordered else start, start)
    media, observations = [], []
    taxa: dict[str, dict] = {}
    for pred, image in pairs:
        stamp = _iso(times[image.key])
        media.append(_media_row(image, deployment, stamp, notes.get(image.key)))
        if not image_failed(pred, image):
            observations += video_event(_observation_rows(pred, image, deployment, stamp, created,
                                                          detection_threshold, taxa), pred, times[image.key])
    project = {"title": f"trapedge: deployment {deployment.deployment_id}", "samplingDesign": "opportunistic",
               "captureMethod": [deployment.capture_method], "individualAnimals": False,
               "observationLevel": ["media"], **info.get("project", {})}
    if project["samplingDesign"] not in SAMPLING_DESIGNS:
        raise ValueError(f"project samplingDesign must be one of {', '.join(SAMPLING_DESIGNS)}")
    version = model_versions(predictions)
    fixed = {"resources", "profile", "created", "project", "spatial", "temporal", "taxonomic"}
    package = {
        "resources": [{"name": name, "path": f"{name}.csv", "profile": "tabular-data-resource",
                       "format": "csv", "mediatype": "text/csv", "encoding": "utf-8", "schema": url}
                      for name, url in CAMTRAP_DP_SCHEMAS.items()],
        "profile": CAMTRAP_DP_PROFILE,
        "name": _package_name(f"trapedge-{deployment.deployment_id}"),
        "created": created.isoformat().replace("+00:00", "Z"),
        "title": f"Camera-trap images of deployment {deployment.deployment_id}, classified by trapedge",
        "description": (f"Media-level machine observations by SpeciesNet {version} and trapedge {__version__}. "
                        "media.filePath is relative to the folder the memory card was copied to."),
        "contributors": [{"title": f"trapedge {__version__}", "role": "contributor"}],
        "sources": [{"title": "SpeciesNet", "version": version}, {"title": "trapedge", "version": __version__}],
        **{k: v for k, v in info.items() if k not in fixed},
        "project": project,
        "spatial": {"type": "Point", "coordinates": [deployment.longitude, deployment.latitude]},
        "temporal": {"start": start.date().isoformat(), "end": end.date().isoformat()},
        "taxonomic": [taxa[name] for name in sorted(taxa)],
    }
    atomic_write_text(folder / "deployments.csv",
                      csv_text(DEPLOYMENT_COLUMNS, [_deployment_row(deployment, start, end, bool(notes))]))
    atomic_write_text(folder / "media.csv", csv_text(MEDIA_COLUMNS, media))
    atomic_write_text(folder / "observations.csv", csv_text(OBSERVATION_COLUMNS, observations))
    atomic_write_text(folder / "datapackage.json", json.dumps(package, ensure_ascii=False, indent=2) + "\n")


def _read_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as fp:
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(fp)]


def merge_camtrap_dp(folder: Path, packages: list[tuple[str, Path]]) -> None:
    """Merges one-deployment packages into one: media and observation ids prefixed by their deployment id."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    deployments, media, observations, taxa, points = [], [], [], {}, []
    base: Optional[dict] = None
    starts, ends = [], []
    for deployment_id, source in packages:
        package = json.loads((Path(source) / "datapackage.json").read_text(encoding="utf-8"))
        base = base or package
        deployments += _read_rows(Path(source) / "deployments.csv")
        for row in _read_rows(Path(source) / "media.csv"):
            media.append({**row, "mediaID": f"{deployment_id}/{row['mediaID']}",
                          "filePath": f"{deployment_id}/{row['filePath']}"})
        for row in _read_rows(Path(source) / "observations.csv"):
            observations.append({**row, "observationID": f"{deployment_id}/{row['observationID']}",
                                 "mediaID": f"{deployment_id}/{row['mediaID']}"})
        taxa.update({t["scientificName"]: t for t in package.get("taxonomic", [])})
        if package["spatial"]["coordinates"] not in points:
            points.append(package["spatial"]["coordinates"])
        starts.append(package["temporal"]["start"])
        ends.append(package["temporal"]["end"])
    if base is None:
        raise ValueError("no Camtrap DP packages to merge")
    ids = [d for d, _ in packages]
    package = {**base, "name": _package_name(f"trapedge-season-{ids[0]}-{len(ids)}"),
               "title": f"Camera-trap images of {len(ids)} deployments, classified by trapedge",
               "description": base["description"].replace(
                   "relative to the folder the memory card was copied to",
                   "relative to a folder holding each card's copy under its deployment ID"),
               "spatial": ({"type": "Point", "coordinates": points[0]} if len(points) == 1
                           else {"type": "MultiPoint", "coordinates": points}),
               "temporal": {"start": min(starts), "end": max(ends)},
               "taxonomic": [taxa[name] for name in sorted(taxa)]}
    package["project"] = {**base["project"], "title": package["project"].get("title", "").replace(
        f"deployment {ids[0]}", f"{len(ids)} deployments")}
    atomic_write_text(folder / "deployments.csv", csv_text(DEPLOYMENT_COLUMNS, deployments))
    atomic_write_text(folder / "media.csv", csv_text(MEDIA_COLUMNS, media))
    atomic_write_text(folder / "observations.csv", csv_text(OBSERVATION_COLUMNS, observations))
    atomic_write_text(folder / "datapackage.json", json.dumps(package, ensure_ascii=False, indent=2) + "\n")
