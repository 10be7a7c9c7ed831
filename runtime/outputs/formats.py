"""Result files the ecosystem reads (SpeciesNet, MegaDetector 1.6, Camtrap DP 1.0.2, flat CSV), written atomically."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .. import __version__
from ..speciesnet.ensemble import FORMAT_VERSION, Classification
from ..speciesnet.ensemble.taxonomy import label_level
from ..atomic import atomic_write_text

if TYPE_CHECKING:
    from ..pipeline import ImageResult

__all__ = [
    "CAMTRAP_DP_PROFILE",
    "CAMTRAP_DP_SCHEMAS",
    "DEPLOYMENT_COLUMNS",
    "Deployment",
    "FLAT_COLUMNS",
    "ImageInfo",
    "MEDIA_COLUMNS",
    "MEGADETECTOR_DETECTION_CATEGORIES",
    "OBSERVATION_COLUMNS",
    "atomic_write_text",
    "final_label",
    "limit_float_precision",
    "write_camtrap_dp",
    "write_flat_csv",
    "write_images_csv",
    "write_megadetector_json",
    "write_predictions_json",
]

_DECIMALS = 4

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
FLAT_COLUMNS = [
    "key", "filepath", "captured", "status", "reason", "detection", "category", "detector_label", "conf",
    "bbox_x", "bbox_y", "bbox_width", "bbox_height", "speciesnet_class", "speciesnet_score", "speciesnet_source",
    "final_class", "final_level", "final_stage", "final_probability", "final_method", "common_name",
    "scientific_name",
]

MEGADETECTOR_FORMAT_VERSION = "1.6"
MEGADETECTOR_DETECTION_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
_MEGADETECTOR_METADATA = {"megadetector_version": "v5a.0.0", "typical_detection_threshold": 0.2,
                          "conservative_detection_threshold": 0.05}
_WHOLE_IMAGE = "0"
_DETECTOR_LABELS = {"1": Classification.ANIMAL.value, "2": Classification.HUMAN.value,
                    "3": Classification.VEHICLE.value}
_DETECTOR_TYPES = {"1": "animal", "2": "human", "3": "vehicle"}
_MEDIATYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".tif": "image/tiff",
               ".tiff": "image/tiff", ".webp": "image/webp"}
_FEATURE_TYPES = ("roadPaved", "roadDirt", "trailHiking", "trailGame", "roadUnderpass", "roadOverpass",
                  "roadBridge", "culvert", "burrow", "nestSite", "carcass", "waterSource", "fruitingTree")
_CAPTURE_METHODS = ("activityDetection", "timeLapse")
_SAMPLING_DESIGNS = ("simpleRandom", "systematicRandom", "clusteredRandom", "experimental", "targeted",
                     "opportunistic")
_RANK_NAMES = ("class", "order", "family", "genus")
_HUMAN_RANKS = ["mammalia", "primates", "hominidae", "homo"]
_RELABELLING_STAGES = ("birds", "score", "calibrated", "smoothing")
_BBOX_FLOOR = 10.0 ** -_DECIMALS


def limit_float_precision(obj: Any, decimals: int = _DECIMALS) -> Any:
    """Rounds every float in nested lists and dicts, as SpeciesNet does before writing."""
    if isinstance(obj, float):
        return round(obj, decimals)
    if isinstance(obj, dict):
        return {k: limit_float_precision(v, decimals) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [limit_float_precision(v, decimals) for v in obj]
    return obj


def _dump_lines(document: dict, rows: str) -> str:
    """JSON with one line per entry of `document[rows]`: readable, and encoded by json's C encoder
    (an `indent` forces the pure-Python encoder, several times slower on a 5,000-image card)."""
    head = {k: v for k, v in document.items() if k != rows}
    items = ",\n  ".join(json.dumps(item, ensure_ascii=False) for item in document[rows])
    body = json.dumps(head, ensure_ascii=False)[:-1]
    sep = ", " if head else ""
    return f'{body}{sep}"{rows}": [\n  {items}\n]}}' if document[rows] else f'{body}{sep}"{rows}": []}}'


def write_predictions_json(path: Path, predictions: list[dict], info: dict | None = None) -> None:
    """Writes SpeciesNet 5.x predictions.json (format 20261015), floats rounded to 4 decimals."""
    document = {"info": {"format_version": FORMAT_VERSION, **(info or {})}, "predictions": predictions}
    text = _dump_lines(limit_float_precision(document), "predictions")
    atomic_write_text(path, text + "\n")


def write_images_csv(path: Path, rows: Iterable[dict]) -> None:
    """Writes one row per image: key, path, size, capture time, status and reason."""
    fields = ["key", "filepath", "width", "height", "captured", "status", "reason"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


@dataclass(frozen=True)
class ImageInfo:
    """One image: dump-relative key, prediction filepath, size, naive camera-local EXIF time, status, file mtime."""

    key: str
    filepath: str
    width: Optional[int] = None
    height: Optional[int] = None
    captured: Optional[str] = None
    status: str = "ok"
    reason: str = ""
    modified_ns: Optional[int] = None

    @classmethod
    def from_result(cls, result: ImageResult) -> ImageInfo:
        """Builds the info of one pass-1 result."""
        mtime = result.record.mtime_ns
        return cls(key=result.record.key, filepath=result.prediction["filepath"], width=result.width,
                   height=result.height, captured=result.captured, status=result.status,
                   reason=result.error or "; ".join(result.warnings),
                   modified_ns=mtime if mtime is not None and mtime >= 0 else None)

    def row(self) -> dict:
        """The images.csv row of this image."""
        return {"key": self.key, "filepath": self.filepath, "width": self.width, "height": self.height,
                "captured": self.captured, "status": self.status, "reason": self.reason}


_OFFSET = re.compile(r"^(?:UTC)?([+-])(\d{1,2}):?(\d{2})?$")


def parse_zone(value: str) -> tzinfo:
    """An IANA zone (Africa/Windhoek) or a fixed UTC offset (+02:00, -0530, UTC+2) as a tzinfo."""
    match = _OFFSET.match(value.strip())
    if match:
        sign, hours, minutes = match.group(1), int(match.group(2)), int(match.group(3) or 0)
        if hours > 14 or minutes > 59:
            raise ValueError(f"UTC offset {value!r} is out of range (-14:00 to +14:00)")
        delta = timedelta(hours=hours, minutes=minutes)
        return timezone(-delta if sign == "-" else delta)
    if value.strip().upper() in ("UTC", "Z"):
        return timezone.utc
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown timezone {value!r}: give an IANA name (e.g. Africa/Windhoek) or a UTC offset "
                         "(e.g. +02:00)") from e


@dataclass(frozen=True)
class Deployment:
    """One camera deployment as Camtrap DP describes it; `timezone` is the camera clock's IANA zone."""

    deployment_id: str
    latitude: float
    longitude: float
    timezone: str
    location_id: Optional[str] = None
    location_name: Optional[str] = None
    coordinate_uncertainty: Optional[int] = None
    start: Optional[str] = None
    end: Optional[str] = None
    setup_by: Optional[str] = None
    camera_id: Optional[str] = None
    camera_model: Optional[str] = None
    camera_delay: Optional[int] = None
    camera_height: Optional[float] = None
    camera_depth: Optional[float] = None
    camera_tilt: Optional[int] = None
    camera_heading: Optional[int] = None
    detection_distance: Optional[float] = None
    timestamp_issues: bool = False
    bait_use: Optional[bool] = None
    feature_type: Optional[str] = None
    habitat: Optional[str] = None
    groups: Optional[str] = None
    tags: Optional[str] = None
    comments: Optional[str] = None
    capture_method: str = "activityDetection"

    def __post_init__(self) -> None:
        if not self.deployment_id or not self.deployment_id.strip():
            raise ValueError("deployment_id must not be empty")
        if not -90 <= self.latitude <= 90:
            raise ValueError(f"latitude must be within [-90, 90], got {self.latitude}")
        if not -180 <= self.longitude <= 180:
            raise ValueError(f"longitude must be within [-180, 180], got {self.longitude}")
        parse_zone(self.timezone)
        if self.coordinate_uncertainty is not None and self.coordinate_uncertainty < 1:
            raise ValueError(f"coordinate_uncertainty must be at least 1 m, got {self.coordinate_uncertainty}")
        if self.feature_type is not None and self.feature_type not in _FEATURE_TYPES:
            raise ValueError(f"feature_type must be one of {', '.join(_FEATURE_TYPES)}, got {self.feature_type!r}")
        if self.capture_method not in _CAPTURE_METHODS:
            raise ValueError(f"capture_method must be one of {', '.join(_CAPTURE_METHODS)}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None:
                _parse_time(value, name)

    @property
    def zone(self) -> tzinfo:
        """The camera clock's time zone."""
        return parse_zone(self.timezone)

    @classmethod
    def from_dict(cls, values: dict) -> Deployment:
        """Builds a deployment from a dict of field names, refusing unknown keys by name."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown deployment fields: {', '.join(sorted(unknown))}")
        return cls(**values)


class _Final(NamedTuple):
    label: str
    probability: float
    method: str
    stage: str


def _final(det: dict) -> _Final:
    rec = det.get("reclassification")
    processed = det.get("processed_classification")
    if rec and rec.get("stage") in _RELABELLING_STAGES and rec.get("class") != rec.get("original"):
        if rec["stage"] == "calibrated" or "probability" in rec:
            probability = rec["probability"]
            method = f"trapedge calibrated pass 2 ({'+'.join(rec.get('sources') or []) or 'evidence'}, precision " \
                     f">= {rec['precision_bound']:.3f})"
        elif rec["stage"] == "smoothing":
            probability = _coarse_probability(det, processed)
            method = "trapedge burst smoothing (event's confident species)"
        elif rec["stage"] == "birds":
            bird = [v for v in (rec.get("aves_score"), rec.get("bird_prompt")) if v is not None]
            probability = max(bird) if bird else float(det.get("conf", 0.0))
            method = "trapedge stage 2 (birds)"
        else:
            probability = _coarse_probability(det, processed)
            method = f"trapedge stage 5 ({rec.get('scoring', 'cosine')})"
            if rec.get("via") == "birds":
                method = f"trapedge stage 2 (birds) + stage 5 ({rec.get('scoring', 'cosine')})"
        return _Final(rec["class"], _probability(probability), method, rec["stage"])
    if processed:
        return _Final(processed["class"], _probability(processed["score"]),
                      f"speciesnet {processed.get('source', 'classifier')}", "speciesnet")
    label = _DETECTOR_LABELS.get(str(det.get("category")), Classification.UNKNOWN.value)
    return _Final(label, _probability(det.get("conf", 0.0)), "megadetector", "detector")


def _coarse_probability(det: dict, processed: Optional[dict]) -> float:
    if processed is None or processed["class"] == Classification.BLANK:
        return float(det.get("conf", 0.0))
    return float(processed["score"])


def _probability(value: Any) -> float:
    return round(min(max(float(value), 0.0), 1.0), _DECIMALS)


def final_label(det: dict) -> tuple[str, float, str]:
    """The label a detection ends with (a stage's re-label, else SpeciesNet's processed class), probability, method."""
    final = _final(det)
    return final.label, final.probability, final.method


def _fields(label: str) -> Optional[list[str]]:
    parts = label.split(";")
    return parts if len(parts) == 7 else None


def _common_name(label: str) -> str:
    parts = _fields(label)
    if parts is None:
        return label or "unknown"
    named = [p for p in parts[1:7] if p]
    return named[-1] if named else "unknown"


def _is_human(label: str) -> bool:
    parts = _fields(label)
    return parts is not None and parts[1:5] == _HUMAN_RANKS


def _level(label: str) -> str:
    if label == Classification.UNKNOWN or _fields(label) is None:
        return ""
    return label_level(label)


def _taxon(label: str) -> Optional[dict]:
    """Camtrap DP taxonomic entry of a label, or None for blank, vehicle, unknown and the like."""
    parts = _fields(label)
    if parts is None or label in (Classification.BLANK, Classification.VEHICLE, Classification.UNKNOWN):
        return None
    level = label_level(label)
    if not level:
        return None
    ranks = dict(zip(("class", "order", "family", "genus", "species"), parts[1:6]))
    entry: dict[str, Any] = {"kingdom": "Animalia"}
    for rank in _RANK_NAMES:
        if ranks[rank]:
            entry[rank] = ranks[rank].capitalize()
    if level == "kingdom":
        name = "Animalia"
    elif level == "species":
        name = f"{ranks['genus'].capitalize()} {ranks['species']}".strip()
    else:
        name = ranks[level].capitalize()
    taxon = {"scientificName": name, "taxonRank": level, **entry}
    if parts[6]:
        taxon["vernacularNames"] = {"eng": parts[6]}
    return taxon


def _observation_type(label: str, category: str) -> str:
    if label == Classification.BLANK:
        return "blank"
    if label == Classification.VEHICLE:
        return "vehicle"
    if label == Classification.UNKNOWN:
        return "unknown"
    if _is_human(label):
        return "human"
    if _taxon(label) is not None:
        return "animal"
    return _DETECTOR_TYPES.get(category, "unknown")


def _index(predictions: list[dict], images: dict[str, ImageInfo]) -> list[tuple[dict, ImageInfo]]:
    """Pairs every prediction with its image info (found by filepath), sorted by key."""
    by_path = {info.filepath: info for info in images.values()}
    pairs = []
    for pred in predictions:
        info = by_path.get(pred["filepath"])
        if info is None:
            raise ValueError(f"no ImageInfo for prediction {pred['filepath']!r}")
        pairs.append((pred, info))
    pairs.sort(key=lambda pair: pair[1].key)
    return pairs


def _failed(pred: dict, info: ImageInfo) -> bool:
    return bool(pred.get("failures")) or info.status == "failed"


def _versions(predictions: list[dict]) -> str:
    return ", ".join(sorted({str(p.get("model_version", "unknown")) for p in predictions})) or "unknown"


def _reclassified(det: dict) -> bool:
    return _final(det).stage in _RELABELLING_STAGES


def _csv_text(columns: list[str], rows: Iterable[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def write_megadetector_json(path: Path, predictions: list[dict], images: dict[str, ImageInfo], *,
                            info: dict) -> None:
    """Writes MegaDetector batch output 1.6: dump-relative files, each classified box with its final label."""
    label_ids: dict[str, str] = {}
    out_images = []
    counts = {stage: 0 for stage in _RELABELLING_STAGES}
    for pred, image in _index(predictions, images):
        entry: dict[str, Any] = {"file": image.key}
        if _failed(pred, image):
            entry["failure"] = "image access failure"
            entry["detections"] = None
        else:
            entry["detections"] = []
            for det in pred.get("detections") or []:
                if str(det.get("category")) == _WHOLE_IMAGE:
                    continue
                out = {"category": str(det["category"]), "conf": float(det["conf"]),
                       "bbox": [float(v) for v in det["bbox"]]}
                if det.get("processed_classification") or _reclassified(det):
                    final = _final(det)
                    out["classifications"] = [[label_ids.setdefault(final.label, str(len(label_ids))),
                                               final.probability]]
                    if final.stage in counts:
                        counts[final.stage] += 1
                if det.get("reclassification"):
                    out["reclassification"] = det["reclassification"]
                entry["detections"].append(out)
        if image.width and image.height:
            entry["width"], entry["height"] = image.width, image.height
        if image.captured:
            entry["datetime"] = _parse_time(image.captured, "captured").strftime("%Y:%m:%d %H:%M:%S")
        out_images.append(entry)
    version = _versions(predictions)
    relabelled = sum(counts.values())
    classifier = f"SpeciesNet {version}"
    if relabelled:
        classifier += f" + trapedge {__version__} re-classification"
    document = {
        "info": {"detector": f"md_v5a.0.0 (SpeciesNet {version} detector, trapedge {__version__} ONNX)",
                 "detector_metadata": dict(_MEGADETECTOR_METADATA), "classifier": classifier,
                 "classifier_metadata": {"speciesnet_model_version": version, "trapedge_version": __version__,
                                         "reclassified_detections": relabelled,
                                         "reclassified_by_stage": counts},
                 **info, "format_version": MEGADETECTOR_FORMAT_VERSION},
        "detection_categories": dict(MEGADETECTOR_DETECTION_CATEGORIES),
        "classification_categories": {i: _common_name(label) for label, i in label_ids.items()},
        "classification_category_descriptions": {i: label for label, i in label_ids.items()},
        "images": out_images,
    }
    atomic_write_text(path, _dump_lines(limit_float_precision(document), "images") + "\n")


def _parse_time(value: str, what: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"{what}: not an ISO 8601 time: {value!r}") from e


def _localise(value: str, zone: ZoneInfo, what: str) -> datetime:
    moment = _parse_time(value, what)
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
    x, y, w, h = (round(float(v), _DECIMALS) for v in det["bbox"])
    return {"bboxX": min(max(x, 0.0), 1.0), "bboxY": min(max(y, 0.0), 1.0),
            "bboxWidth": min(max(w, _BBOX_FLOOR), 1.0), "bboxHeight": min(max(h, _BBOX_FLOOR), 1.0)}


def _classified_by(final: _Final, model_version: str) -> str:
    if final.method.startswith("trapedge "):
        return f"SpeciesNet {model_version} + trapedge {__version__} {final.method[len('trapedge '):]}"
    if final.method == "megadetector":
        return f"SpeciesNet {model_version} (MegaDetector only)"
    return f"SpeciesNet {model_version}"


def _package_name(text: str) -> str:
    return re.sub(r"[^-a-z0-9._]+", "-", text.lower()).strip("-") or "trapedge"


def _created(info: dict) -> datetime:
    moment = _parse_time(info["created"], "created") if info.get("created") else datetime.now(timezone.utc)
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
        final = _final(det)
        category = str(det.get("category"))
        kind = _observation_type(final.label, category)
        taxon = None
        if kind in ("animal", "human"):
            taxon = _taxon(final.label) or _taxon(Classification.HUMAN.value if kind == "human"
                                                   else Classification.ANIMAL.value)
        row = {**base, "observationID": f"{image.key}#{idx}", "observationType": kind,
               "scientificName": taxon["scientificName"] if taxon else None,
               "count": 1 if taxon else None, "classifiedBy": _classified_by(final, model_version),
               "classificationProbability": final.probability}
        if category != _WHOLE_IMAGE and det.get("bbox"):
            row.update(_bbox(det))
        rows.append(row)
        if taxon:
            taxa.setdefault(taxon["scientificName"], taxon)
    return rows


def write_camtrap_dp(folder: Path, predictions: list[dict], images: dict[str, ImageInfo],
                     deployment: Deployment, *, info: dict, detection_threshold: float = 0.1) -> None:
    """Writes a Camtrap DP 1.0.2 package: one media-level observation per box, timestamps in the deployment's zone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = _index(predictions, images)
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
        if not _failed(pred, image):
            observations += _observation_rows(pred, image, deployment, stamp, created, detection_threshold, taxa)
    project = {"title": f"trapedge: deployment {deployment.deployment_id}", "samplingDesign": "opportunistic",
               "captureMethod": [deployment.capture_method], "individualAnimals": False,
               "observationLevel": ["media"], **info.get("project", {})}
    if project["samplingDesign"] not in _SAMPLING_DESIGNS:
        raise ValueError(f"project samplingDesign must be one of {', '.join(_SAMPLING_DESIGNS)}")
    version = _versions(predictions)
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
                      _csv_text(DEPLOYMENT_COLUMNS, [_deployment_row(deployment, start, end, bool(notes))]))
    atomic_write_text(folder / "media.csv", _csv_text(MEDIA_COLUMNS, media))
    atomic_write_text(folder / "observations.csv", _csv_text(OBSERVATION_COLUMNS, observations))
    atomic_write_text(folder / "datapackage.json", json.dumps(package, ensure_ascii=False, indent=2) + "\n")


def _rounded(value: Any) -> Any:
    return round(float(value), _DECIMALS) if value is not None else None


def write_flat_csv(path: Path, predictions: list[dict], images: dict[str, ImageInfo]) -> None:
    """Writes one row per detection (one per image without any), SpeciesNet's label beside the final one."""
    rows = []
    for pred, image in _index(predictions, images):
        base = {"key": image.key, "filepath": image.filepath, "captured": image.captured,
                "status": "failed" if _failed(pred, image) else image.status,
                "reason": image.reason or pred.get("failure_reason")}
        detections = pred.get("detections") or []
        if not detections:
            rows.append(base)
        for idx, det in enumerate(detections):
            processed = det.get("processed_classification") or {}
            final = _final(det)
            taxon = _taxon(final.label)
            x, y, w, h = det.get("bbox") or (None, None, None, None)
            rows.append({**base, "detection": idx, "category": det.get("category"),
                         "detector_label": det.get("label"), "conf": _rounded(det.get("conf")),
                         "bbox_x": _rounded(x), "bbox_y": _rounded(y), "bbox_width": _rounded(w),
                         "bbox_height": _rounded(h), "speciesnet_class": processed.get("class"),
                         "speciesnet_score": _rounded(processed.get("score")),
                         "speciesnet_source": processed.get("source"), "final_class": final.label,
                         "final_level": _level(final.label), "final_stage": final.stage,
                         "final_probability": final.probability, "final_method": final.method,
                         "common_name": _common_name(final.label),
                         "scientific_name": taxon["scientificName"] if taxon else None})
    atomic_write_text(path, _csv_text(FLAT_COLUMNS, rows))
