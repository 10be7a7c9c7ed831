"""The card report: one offline HTML page of what a run found (counts, activity, folders, pass 2, thumbnails)."""

from __future__ import annotations

import base64
import io
import math
import posixpath
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Optional

from jinja2 import Environment, StrictUndefined

from ..atomic import atomic_write_text
from ..card.video import frame_key
from ..speciesnet.detector import DetectorConfig
from . import charts
from .images import check_privacy, is_human, load_media, protect, thumbnail
from .taxa import RELABELLING_STAGES, common_name, final, level, observation_type, taxon
from .video import video_detections

__all__ = ["REPORT_NAME", "build_report", "stricter", "summarise", "write_report"]

REPORT_NAME = "report.html"
TEMPLATE = "report.html.j2"
THUMBNAILS_PER_SPECIES = 6
SPECIES_GRIDS = 12
CHART_ROWS = 25
THUMBNAIL_SIDE = 320
THUMBNAIL_QUALITY = 90
MAX_DATE_BARS = 120
MAX_FAILURES = 200
KINDS = ("animal", "human", "vehicle", "unknown", "blank", "failed")
STAGE_NAMES = {"accept": "Stage 1: high-confidence acceptance (kept SpeciesNet's label)",
               "birds": "Stage 2: bird override", "score": "Stage 5: adaptive distance scoring",
               "calibrated": "Calibrated decision (stages 3-5 with a precision bound)",
               "smoothing": "Burst smoothing"}


@dataclass
class _Media:
    """One photo or video as the report counts it."""

    key: str
    prediction: dict
    captured: Optional[str]
    failed: bool
    reason: Optional[str]
    warned: bool = False
    counted: list[dict] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)


def _above(detections: list[dict], threshold: float) -> list[dict]:
    return [d for d in detections if float(d.get("conf", 0.0)) >= threshold]


def _media(predictions: list[dict], images: list[dict], threshold: float) -> list[_Media]:
    """Each photo or video with its counted detections (a video: its deciding frame's) and what it holds (a
    video: what any of its frames holds)."""
    by_path = {image["filepath"]: image for image in images}
    media = []
    for pred in predictions:
        image = by_path.get(pred["filepath"], {})
        failed = bool(pred.get("failures")) or image.get("status") == "failed"
        item = _Media(image.get("key") or pred["filepath"], pred, image.get("captured"), failed,
                      pred.get("failure_reason") or image.get("reason"), image.get("status") == "warning")
        if failed:
            item.kinds.add("failed")
        else:
            item.counted = _above(pred.get("detections") or [], threshold)
            seen = item.counted + (_above(video_detections(pred), threshold) if "video" in pred else [])
            kinds = {observation_type(final(d).label, str(d.get("category"))) for d in seen} - {"blank"}
            item.kinds = kinds or {"blank"}
        media.append(item)
    return media


def _when(captured: Optional[str]) -> Optional[datetime]:
    """The capture time on the camera clock, or None when missing or unreadable."""
    try:
        return datetime.fromisoformat(captured) if captured else None
    except ValueError:
        return None


def _hour(captured: Optional[str]) -> Optional[int]:
    when = _when(captured)
    return when.hour if when else None


def _day(captured: Optional[str]) -> Optional[date]:
    when = _when(captured)
    return when.date() if when else None


def _species(media: list[_Media]) -> list[dict]:
    rows: dict[str, dict] = {}
    for item in media:
        for det in item.counted:
            chosen = final(det)
            if observation_type(chosen.label, str(det.get("category"))) != "animal":
                continue
            row = rows.setdefault(chosen.label, {
                "label": chosen.label, "name": common_name(chosen.label), "level": level(chosen.label) or "-",
                "scientific": (taxon(chosen.label) or {}).get("scientificName", ""), "detections": 0,
                "media": set(), "relabelled": 0})
            row["detections"] += 1
            row["media"].add(item.key)
            row["relabelled"] += chosen.stage in RELABELLING_STAGES
    ordered = sorted(rows.values(), key=lambda r: (-r["detections"], r["name"], r["label"]))
    return [{**row, "media": len(row["media"])} for row in ordered]


def _dates(media: list[_Media]) -> list[tuple[str, int]]:
    """Media with animals per capture date, every day from the first to the last; over a long span (or a camera
    clock reset to 2000) in bins of whole weeks, never more than MAX_DATE_BARS of them."""
    days = Counter(day for item in media if "animal" in item.kinds and (day := _day(item.captured)) is not None)
    if not days:
        return []
    first, last = min(days), max(days)
    span = (last - first).days + 1
    step = 1 if span <= MAX_DATE_BARS else 7 * math.ceil(span / (7 * MAX_DATE_BARS))
    bars = []
    start = first
    while start <= last:
        count = sum(days.get(start + timedelta(days=i), 0) for i in range(step))
        label = start.isoformat() if step == 1 else (f"week of {start.isoformat()}" if step == 7
                                                     else f"{step // 7} weeks from {start.isoformat()}")
        bars.append((label, count))
        start += timedelta(days=step)
    return bars


def _folders(media: list[_Media]) -> list[dict]:
    rows: dict[str, dict] = {}
    for item in media:
        folder = posixpath.dirname(item.key) or "(card root)"
        row = rows.setdefault(folder, {"folder": folder, "media": 0, "detections": 0, "animal": 0, "blank": 0,
                                       "failed": 0})
        row["media"] += 1
        row["detections"] += len(item.counted)
        for kind in ("animal", "blank", "failed"):
            row[kind] += kind in item.kinds
    return sorted(rows.values(), key=lambda r: r["folder"])


def _pass_two(media: list[_Media], info: dict) -> Optional[dict]:
    recorded = (info.get("trapedge") or {}).get("reclassification")
    if recorded is None:
        return None
    stages: Counter = Counter()
    moves: Counter = Counter()
    for item in media:
        for det in item.counted:
            rec = det.get("reclassification") or {}
            stage = rec.get("stage")
            if stage == "accept":
                stages["accept"] += 1
            elif stage in RELABELLING_STAGES and rec.get("class") != rec.get("original"):
                stages[stage] += 1
                moves[(stage, common_name(rec.get("original") or ""), common_name(rec["class"]))] += 1
    calibration = []
    for name, cal in ((recorded.get("calibration") or {}).get("levels") or {}).items():
        if cal.get("enabled"):
            text = (f"on: precision >= {cal['lower_bound']:.3f} (95% bound) on {cal['accepted']} held-out views, "
                    f"threshold {cal['threshold']:.3f}")
        else:
            text = f"off: {cal.get('reason', '')}"
        calibration.append({"level": name, "enabled": bool(cal.get("enabled")), "text": text})
    return {"stages": [{"stage": s, "name": STAGE_NAMES.get(s, s), "detections": stages.get(s, 0)}
                       for s in ("accept", *RELABELLING_STAGES)],
            "moves": [{"stage": STAGE_NAMES.get(s, s), "from": a, "to": b, "count": n}
                      for (s, a, b), n in sorted(moves.items(), key=lambda kv: (-kv[1], kv[0]))],
            "calibration": calibration, "decision": (recorded.get("stages") or {}).get("decision", ""),
            "notes": list(recorded.get("notes") or [])}


def summarise(predictions: list[dict], images: list[dict], info: dict, threshold: float) -> dict:
    """Every number the report shows, from the predictions and image rows of predictions.json and images.csv."""
    return _summary(_media(predictions, images, threshold), info, threshold)


def _summary(media: list[_Media], info: dict, threshold: float) -> dict:
    total = len(media)
    kinds = {kind: sum(kind in item.kinds for item in media) for kind in KINDS}
    hours = Counter(hour for item in media if "animal" in item.kinds and (hour := _hour(item.captured)) is not None)
    return {
        "media": total, "videos": sum("video" in item.prediction for item in media),
        "detections": sum(len(item.counted) for item in media), "threshold": threshold,
        "rates": [{"kind": kind, "media": kinds[kind], "share": kinds[kind] / total if total else 0.0}
                  for kind in KINDS],
        "species": _species(media),
        "hours": [hours.get(h, 0) for h in range(24)],
        "dates": _dates(media),
        "undated": sum(1 for item in media if not item.failed and _day(item.captured) is None),
        "folders": _folders(media),
        "pass_two": _pass_two(media, info),
        "failures": [{"key": item.key, "reason": item.reason or ""} for item in media if item.failed],
        "warnings": [{"key": item.key, "reason": item.reason or ""} for item in media
                     if item.warned and not item.failed],
    }


def _source(item: _Media) -> str:
    """What to decode for a media item's thumbnail, as an absolute path: the photo, or a video's deciding frame
    (so media of several cards, as in a season's report, load from where they are)."""
    path = item.prediction["filepath"]
    video = item.prediction.get("video")
    if not video or "frame_number" not in video:
        return path
    return frame_key(path, int(video["frame_number"]), float(video["frame_rate"]))


def _jpeg_uri(image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, subsampling=0)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grids(media: list[_Media], species: list[dict], privacy: str) -> list[dict]:
    """Up to THUMBNAILS_PER_SPECIES thumbnails (boxes drawn, people protected) for each of the commonest species."""
    best: dict[str, list[tuple[float, _Media]]] = defaultdict(list)
    for item in media:
        scores: dict[str, float] = {}
        for det in item.counted:
            chosen = final(det)
            scores[chosen.label] = max(scores.get(chosen.label, 0.0), chosen.probability)
        for label, score in scores.items():
            best[label].append((score, item))
    cache: dict[str, Optional[str]] = {}
    grids = []
    for row in species[:SPECIES_GRIDS]:
        cells = []
        for score, item in sorted(best[row["label"]], key=lambda e: (-e[0], e[1].key)):
            if len(cells) == THUMBNAILS_PER_SPECIES:
                break
            if item.key not in cache:
                cache[item.key] = _thumbnail(item, privacy)
            if cache[item.key] is not None:
                cells.append({"key": item.key, "score": score, "src": cache[item.key]})
        grids.append({"name": row["name"], "label": row["label"], "cells": cells})
    return grids


def _thumbnail(item: _Media, privacy: str) -> Optional[str]:
    detections = item.prediction.get("detections") or []
    everywhere = detections + (video_detections(item.prediction) if "video" in item.prediction else [])
    if privacy == "drop" and any(is_human(det) for det in everywhere):
        return None
    if any(is_human(det) and not det.get("bbox") for det in detections):
        return None  # a person with no box cannot be hidden
    humans = [det["bbox"] for det in detections if is_human(det)]
    image = load_media(Path("/"), _source(item), draft_long_side=2 * THUMBNAIL_SIDE)
    if image is None:
        return None
    boxed = [det for det in detections if det.get("bbox")]
    return _jpeg_uri(thumbnail(protect(image, humans, privacy), boxed, THUMBNAIL_SIDE))


def _charts(summary: dict) -> dict[str, Optional[str]]:
    species = summary["species"][:CHART_ROWS]
    folders = sorted(summary["folders"], key=lambda r: -r["detections"])[:CHART_ROWS]
    dates = summary["dates"]
    return {
        "species": charts.bar_chart([r["name"] for r in species], [r["detections"] for r in species],
                                    title="Detections per label", horizontal=True, value_label="detections"),
        "hours": charts.bar_chart([f"{h:02d}" for h in range(24)], summary["hours"],
                                  title="Media with animals by hour of day (camera clock)",
                                  value_label="media") if any(summary["hours"]) else None,
        "dates": charts.bar_chart([d for d, _ in dates], [n for _, n in dates], title="Media with animals by date",
                                  value_label="media", rotate=True) if dates else None,
        "folders": charts.bar_chart([r["folder"] for r in folders], [r["detections"] for r in folders],
                                    title="Detections per camera folder", horizontal=True,
                                    value_label="detections") if folders else None,
    }


def stricter(a: str, b: str) -> str:
    """The stricter of two privacy modes (drop > box > blur), for a page over cards run with different ones."""
    order = ("blur", "box", "drop")
    return max(check_privacy(a), check_privacy(b), key=order.index)


def _environment() -> Environment:
    return Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def build_report(predictions: list[dict], images: list[dict], info: dict, card: Path, *, privacy: str = "blur",
                 threshold: Optional[float] = None, title: Optional[str] = None,
                 generated: Optional[datetime] = None) -> str:
    """The report's HTML: self-contained (styles inline, charts as inline SVG, thumbnails as data URIs), no script,
    and a content security policy that forbids every network request."""
    check_privacy(privacy)
    facts = (info.get("trapedge") or {}).get("detector") or {}
    if threshold is None:
        recorded = facts.get("typical_detection_threshold")
        threshold = recorded if recorded is not None else DetectorConfig().typical_threshold
    threshold = float(threshold)
    media = _media(predictions, images, threshold)
    summary = _summary(media, info, threshold)
    template = _environment().from_string(
        resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8"))
    trapedge = info.get("trapedge") or {}
    return template.render(
        title=title or f"trapedge report: {Path(card).name or card}", card=str(card), summary=summary,
        season="deployments" in (info.get("trapedge") or {}),
        charts=_charts(summary), charts_available=charts.available(),
        grids=_grids(media, summary["species"], privacy), privacy=privacy,
        failures=summary["failures"][:MAX_FAILURES], more_failures=max(0, len(summary["failures"]) - MAX_FAILURES),
        warnings=summary["warnings"][:MAX_FAILURES], more_warnings=max(0, len(summary["warnings"]) - MAX_FAILURES),
        version=trapedge.get("version", ""), model_version=trapedge.get("bundle_model_version", ""),
        data_version=trapedge.get("bundle_data_version", ""), detector=facts.get("name") or "",
        generated=(generated or datetime.now(timezone.utc)).replace(microsecond=0).isoformat(),
        thumbnails_per_species=THUMBNAILS_PER_SPECIES, species_grids=SPECIES_GRIDS)


def write_report(path: Path, predictions: list[dict], images: list[dict], info: dict, card: Path, *,
                 privacy: str = "blur", threshold: Optional[float] = None, title: Optional[str] = None) -> Path:
    """Writes the report atomically to `path` and returns it."""
    atomic_write_text(Path(path), build_report(predictions, images, info, card, privacy=privacy,
                                               threshold=threshold, title=title))
    return Path(path)
