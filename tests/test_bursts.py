"""Bursts with known capture times; smoothing and event pooling in pass 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import test_stages as ts
from test_reclassify import make_bundle, scenario
from trapedge.runtime.models.bundle import Bundle
from trapedge.runtime.card.bursts import dominant_labels, group_events, pool_by_event
from trapedge.runtime.reclassify.runner import Reclassifier
from trapedge.runtime.reclassify.stages import StageConfig, is_descendant


def test_events_split_on_gap_per_camera_and_break_ties_by_name() -> None:
    images = [
        {"key": "CAM1/IMG_0003.JPG", "captured": "2024-05-01T10:00:30"},
        {"key": "CAM1/IMG_0001.JPG", "captured": "2024-05-01T10:00:00"},
        {"key": "CAM1/IMG_0002.JPG", "captured": "2024-05-01T10:00:00"},
        {"key": "CAM1/IMG_0004.JPG", "captured": "2024-05-01T10:02:00"},
        {"key": "CAM2/IMG_0001.JPG", "captured": "2024-05-01T10:00:10"},
        {"key": "CAM2/IMG_0009.JPG", "captured": None},
    ]
    events = group_events(images, gap_s=60)
    assert events["CAM1/IMG_0001.JPG"] == events["CAM1/IMG_0002.JPG"] == events["CAM1/IMG_0003.JPG"]
    assert events["CAM1/IMG_0004.JPG"] != events["CAM1/IMG_0003.JPG"]
    assert events["CAM2/IMG_0001.JPG"] != events["CAM1/IMG_0001.JPG"]  # another camera, same time
    assert events["CAM2/IMG_0009.JPG"] not in {v for k, v in events.items() if k != "CAM2/IMG_0009.JPG"}
    assert len(set(group_events(images, gap_s=200).values())) == 3
    assert len(set(group_events(images, gap_s=0).values())) == 5  # equal times stay together


def test_real_photo_times_make_one_burst(photos) -> None:
    from trapedge.runtime.card.ingest import decode, scan

    images = [{"key": r.key, "captured": decode(r).captured} for r in scan(photos[0].parent)]
    assert len(set(group_events(images, gap_s=5).values())) == 1  # ten shots over six seconds
    assert len(set(group_events(images, gap_s=0.5).values())) > 1


def test_dominant_label_and_pooling() -> None:
    assert dominant_labels(["a", None, "b", "a", "c"], ["e1", "e1", "e1", "e1", "e2"]) == {"e1": "a", "e2": "c"}
    v = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pooled = pool_by_event(v, ["g", "g", "h"])
    assert np.allclose(pooled[0], pooled[1]) and np.allclose(pooled[0], [2 ** -0.5, 2 ** -0.5])


def test_smoothing_fills_coarse_detections_from_their_event(tmp_path: Path) -> None:
    predictions, table, _ = scenario()
    events = {"/card/refs.jpg": "burst", "/card/coarse.jpg": "burst"}
    reclassifier = Reclassifier(Bundle.load(make_bundle(tmp_path / "b")), StageConfig(decision="smoothing"),
                                events=events)
    counts = reclassifier.run(predictions, table)
    smoothed = [d["reclassification"] for d in predictions[1]["detections"]
                if d.get("reclassification", {}).get("stage") == "smoothing"]
    assert counts["smoothing"] == len(smoothed) >= 1
    dominant = dominant_labels([r["class"] for d in predictions[0]["detections"]
                                for r in [d["reclassification"]]], ["burst"] * 18)["burst"]
    for rec in smoothed:
        assert rec["class"] == dominant and rec["event"] == "burst"
    assert "reclassification" not in predictions[1]["detections"][4]  # a blank below the detector floor
    for det in predictions[1]["detections"]:
        rec = det.get("reclassification")
        if rec and rec["stage"] == "smoothing":
            assert is_descendant(rec["class"], det["processed_classification"]["class"])


def test_event_pooling_scores_views_together(tmp_path: Path) -> None:
    predictions, table, _ = scenario()
    reclassifier = Reclassifier(Bundle.load(make_bundle(tmp_path / "b")), StageConfig(decision="adaptive"),
                                event_pooling=True,
                                events={"/card/refs.jpg": "e0", "/card/coarse.jpg": "e1"})
    counts = reclassifier.run(predictions, table)
    assert counts["score"] >= 2
    rec = predictions[1]["detections"][0]["reclassification"]
    assert rec["class"] == ts.LION


def test_images_without_exif_time_fall_back_to_file_time() -> None:
    second = 1_000_000_000
    images = [
        {"key": "CAM1/A.JPG", "captured": None, "modified_ns": 1_700_000_000 * second},
        {"key": "CAM1/B.JPG", "captured": None, "modified_ns": 1_700_000_010 * second},
        {"key": "CAM1/C.JPG", "captured": None, "modified_ns": 1_700_000_500 * second},
        {"key": "CAM1/D.JPG", "captured": None},
    ]
    events = group_events(images, gap_s=60)
    assert events["CAM1/A.JPG"] == events["CAM1/B.JPG"] != events["CAM1/C.JPG"]
    assert events["CAM1/D.JPG"] not in (events["CAM1/A.JPG"], events["CAM1/C.JPG"])  # no time at all: alone
