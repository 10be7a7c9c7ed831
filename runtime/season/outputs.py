"""The season's merged files: one Camtrap DP package, one MegaDetector JSON, a summary CSV per deployment."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_text
from ..outputs.camtrap_dp import merge_camtrap_dp
from ..outputs.flat_csv import csv_text
from ..outputs.report import REPORT_NAME, stricter, write_report
from ..outputs.speciesnet_json import dump_lines
from ..outputs.store import STORE_NAME, Store
from ..outputs.taxa import common_name, final
from ..outputs.video import aggregate_videos

__all__ = ["SUMMARY_COLUMNS", "CardSummary", "season_report", "write_season"]

SUMMARY_COLUMNS = ["deployment_id", "card", "status", "reason", "images", "failed_images", "detections",
                   "classified", "labels"]


@dataclass
class CardSummary:
    """One card's line of the season: where it is, how it ended, and (once done) its counts."""

    deployment_id: str
    card: str
    out: Path
    status: str
    reason: str = ""
    deployment: Optional[dict] = None
    images: int = 0
    failed_images: int = 0
    detections: int = 0
    classified: int = 0
    labels: Optional[dict] = None

    def row(self) -> dict:
        """The summary.csv row; labels as 'name: count' pairs, most frequent first."""
        labels = "; ".join(f"{k}: {v}" for k, v in (self.labels or {}).items())
        return {"deployment_id": self.deployment_id, "card": self.card, "status": self.status,
                "reason": self.reason or None, "images": self.images, "failed_images": self.failed_images,
                "detections": self.detections, "classified": self.classified, "labels": labels or None}


def _count(summary: CardSummary) -> None:
    """Fills a finished card's counts from its store."""
    store = Store(summary.out / STORE_NAME)
    try:
        predictions = store.predictions(Path(summary.card))
        images = store.images(Path(summary.card))
    finally:
        store.close()
    detections = [d for p in predictions for d in p.get("detections") or []]
    labelled = [d for d in detections if d.get("processed_classification") or d.get("reclassification")]
    summary.images, summary.detections, summary.classified = len(images), len(detections), len(labelled)
    summary.failed_images = sum(1 for i in images if i["status"] == "failed")
    summary.labels = dict(Counter(common_name(final(d).label) for d in labelled).most_common())


def _megadetector(root: Path, done: list[CardSummary]) -> Optional[Path]:
    """Every card's MegaDetector images, file names prefixed by the deployment id, categories renumbered."""
    merged: Optional[dict] = None
    ids: dict[str, str] = {}
    images = []
    for card in done:
        path = card.out / "megadetector.json"
        if not path.is_file():
            continue
        document = json.loads(path.read_text(encoding="utf-8"))
        merged = merged or document
        descriptions = document.get("classification_category_descriptions", {})
        for image in document["images"]:
            image = {**image, "file": f"{card.deployment_id}/{image['file']}"}
            for det in image.get("detections") or []:
                if det.get("classifications"):
                    det["classifications"] = [[ids.setdefault(descriptions[c], str(len(ids))), p]
                                              for c, p in det["classifications"]]
            images.append(image)
    if merged is None:
        return None
    merged = {**merged, "images": images,
              "classification_categories": {i: common_name(label) for label, i in ids.items()},
              "classification_category_descriptions": {i: label for label, i in ids.items()}}
    merged["info"] = {**merged["info"], "deployments": [c.deployment_id for c in done]}
    merged["info"].pop("trapedge", None)
    target = root / "megadetector.json"
    atomic_write_text(target, dump_lines(merged, "images") + "\n")
    return target


def season_report(root: Path, done: list[CardSummary]) -> Optional[Path]:
    """ROOT/report.html over every finished card: keys prefixed by the deployment id (so camera folders group by
    deployment), people under the strictest privacy mode any card ran with; calibration stays per card."""
    predictions: list[dict] = []
    images: list[dict] = []
    privacy, info = "blur", None
    for card in done:
        store = Store(card.out / STORE_NAME)
        try:
            preds, rows = aggregate_videos(store.predictions(Path(card.card)), store.images(Path(card.card)))
            privacy = stricter(privacy, store.get_meta("privacy") or "blur")
        finally:
            store.close()
        predictions += preds
        images += [{**row, "key": f"{card.deployment_id}/{row['key']}"} for row in rows]
        if info is None and (card.out / "predictions.json").is_file():
            info = json.loads((card.out / "predictions.json").read_text(encoding="utf-8")).get("info", {})
    if not done:
        return None
    recorded = dict((info or {}).get("trapedge") or {})
    pass_two = recorded.pop("reclassification", None)
    if pass_two is not None:
        recorded["reclassification"] = {
            "stages": pass_two.get("stages", {}), "calibration": {},
            "notes": ["each card calibrates pass 2 on its own photos: its bounds are in DEPLOYMENT/report.html"]}
    recorded["deployments"] = [c.deployment_id for c in done]
    return write_report(root / REPORT_NAME, predictions, images, {"trapedge": recorded}, root, privacy=privacy,
                        title=f"trapedge season report: {len(done)} deployments")


def write_season(root: Path, cards: list[CardSummary], *, report: bool = True) -> list[Path]:
    """Writes ROOT/summary.csv, ROOT/megadetector.json, ROOT/camtrap-dp/ and (with `report`) ROOT/report.html from
    the finished cards."""
    root = Path(root)
    done = [c for c in cards if c.status == "done"]
    for card in done:
        _count(card)
    written = [root / "summary.csv"]
    atomic_write_text(written[0], csv_text(SUMMARY_COLUMNS, [c.row() for c in cards]))
    md = _megadetector(root, done)
    if md is not None:
        written.append(md)
    packages = [(c.deployment_id, c.out / "camtrap-dp") for c in done
                if (c.out / "camtrap-dp" / "datapackage.json").is_file()]
    if packages:
        merge_camtrap_dp(root / "camtrap-dp", packages)
        written.append(root / "camtrap-dp")
    page = season_report(root, done) if report else None
    if page is not None:
        written.append(page)
    return written
