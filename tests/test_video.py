"""Video clips on a card: frames sampled, one prediction per video, MegaDetector 1.6 and Camtrap DP video fields."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from test_end_to_end import run_cli
from test_formats import _validate
from trapedge.runtime.card.bursts import group_events
from trapedge.runtime.card.ingest import decode, scan
from trapedge.runtime.card.video import is_video, parse_frame_key
from trapedge.runtime.demo import build_demo_bundle, sample_photos
from trapedge.runtime.outputs.video import aggregate_videos, deciding_frame

FPS, SECONDS, SIZE = 10.0, 3, (320, 240)
GOOD = {"100MEDIA/CLIP0001.mp4": ("mp4v", "video/mp4"), "100MEDIA/CLIP0002.avi": ("MJPG", "video/x-msvideo"),
        "101MEDIA/CLIP0003.MOV": ("mp4v", "video/quicktime")}
DEPLOYMENT = ("--timezone", "Africa/Windhoek", "--lat", "-19.5", "--lon", "13.2")


def write_clip(path: Path, photo: Path, fourcc: str = "mp4v", seconds: float = SECONDS, zoom: float = 0.3) -> Path:
    """A clip panning and zooming over a real photo, at 10 fps."""
    image = cv2.imread(str(photo))
    height, width = image.shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, SIZE)
    assert writer.isOpened(), path
    frames = int(seconds * FPS)
    for i in range(frames):
        scale = 1.0 - zoom * i / frames
        w, h = int(width * scale), int(height * scale)
        x, y = int((width - w) * i / frames), (height - h) // 2
        writer.write(cv2.resize(image[y:y + h, x:x + w], SIZE, interpolation=cv2.INTER_AREA))
    writer.release()
    return path


def make_card(root: Path, photos: list[Path], broken: bool = True) -> Path:
    """Two photos, three clips (mp4, avi, .MOV) and, if asked, a truncated clip and a garbage .mp4."""
    for photo in photos[:2]:
        (root / "100MEDIA").mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, root / "100MEDIA" / photo.name)
    for i, (name, (fourcc, _)) in enumerate(GOOD.items()):
        write_clip(root / name, photos[2 + i], fourcc)
    if broken:
        data = write_clip(root / "102MEDIA" / "CUT.MP4", photos[5]).read_bytes()
        (root / "102MEDIA" / "CUT.MP4").write_bytes(data[: len(data) // 2])
        (root / "102MEDIA" / "JUNK.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    return root


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    return build_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo")


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, demo_bundle: Path) -> tuple[Path, Path]:
    card = make_card(tmp_path_factory.mktemp("card"), sample_photos())
    out = tmp_path_factory.mktemp("out")
    run_cli("run", str(card), "--bundle", str(demo_bundle), "--out", str(out), "--quiet", *DEPLOYMENT)
    return card, out


def _keys(out: Path) -> dict[str, float]:
    with sqlite3.connect(out / "results.sqlite") as db:
        return dict(db.execute("SELECT key, updated FROM images"))


def test_scan_samples_frames_at_the_asked_interval(tmp_path: Path) -> None:
    photos = sample_photos()
    card = make_card(tmp_path, photos)
    plain = [r.key for r in scan(card)]
    assert [k for k in plain if not is_video(k) and not parse_frame_key(k)] == \
        sorted(f"100MEDIA/{p.name}" for p in photos[:2])
    for every, frames in ((1.0, [0, 10, 20]), (0.5, [0, 5, 10, 15, 20, 25]), (2.0, [0, 20])):
        records = list(scan(card, video_every=every))
        for video in GOOD:
            got = [parse_frame_key(r.key)[1] for r in records if r.key.startswith(video + "#")]
            assert got == frames, (video, every)
    records = list(scan(card, video_every_frames=7))
    assert [parse_frame_key(r.key)[1] for r in records if r.key.startswith("100MEDIA/CLIP0001.mp4#")] == \
        [0, 7, 14, 21, 28]
    clip = card / "100MEDIA" / "CLIP0001.mp4"
    frame = next(r for r in records if r.key.startswith("100MEDIA/CLIP0001.mp4#frame=000014"))
    assert (frame.size, frame.mtime_ns) == (clip.stat().st_size, clip.stat().st_mtime_ns)
    decoded = decode(frame)
    assert decoded.ok and decoded.pixels.shape == (SIZE[1], SIZE[0], 3) and decoded.pixels.dtype == np.uint8
    capture = cv2.VideoCapture(str(clip))
    for _ in range(15):
        _, bgr = capture.read()
    assert np.array_equal(decoded.pixels, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    broken = {r.key: decode(r) for r in records if r.key.startswith("102MEDIA/")}
    assert set(broken) == {"102MEDIA/CUT.MP4", "102MEDIA/JUNK.mp4"}
    assert all(not d.ok and "not a readable video" in d.error for d in broken.values())
    images = [{"key": r.key, "captured": None, "modified_ns": r.mtime_ns} for r in records]
    events = group_events(images, 60.0)
    for video in GOOD:
        assert len({e for k, e in events.items() if k.startswith(video + "#")}) == 1
    assert {e for k, e in events.items() if "#frame=" in k} == {f"{video}#video" for video in GOOD}
    assert not any(e.endswith("#video") for k, e in events.items() if not is_video(k) and not parse_frame_key(k))


def test_megadetector_json_has_the_video_fields_and_validates(video_run) -> None:
    _, out = video_run
    validate = pytest.importorskip("megadetector.postprocessing.validate_batch_results")
    options = validate.ValidateBatchResultsOptions()
    options.raise_errors = True
    result = validate.validate_batch_results(str(out / "megadetector.json"), options)["validation_results"]
    assert result["errors"] == [] and result["warnings"] == []
    md = {entry["file"]: entry for entry in json.loads((out / "megadetector.json").read_text())["images"]}
    assert not any("#" in name for name in md)
    for video in GOOD:
        entry = md[video]
        assert entry["frame_rate"] == FPS and entry["frames_processed"] == [0, 10, 20]
        assert (entry["width"], entry["height"]) == SIZE
        numbers = [d["frame_number"] for d in entry["detections"]]
        assert numbers == sorted(numbers) and set(numbers) <= {0, 10, 20}
    for bad in ("102MEDIA/CUT.MP4", "102MEDIA/JUNK.mp4"):
        assert md[bad]["failure"] and md[bad]["detections"] is None
        assert md[bad]["frame_rate"] == -1.0 and md[bad]["frames_processed"] == []


def test_predictions_json_has_one_prediction_per_video_with_the_deciding_frame(video_run) -> None:
    card, out = video_run
    predictions = json.loads((out / "predictions.json").read_text())["predictions"]
    by_file = {Path(p["filepath"]).relative_to(card.resolve()).as_posix(): p for p in predictions}
    assert len(predictions) == 2 + len(GOOD) + 2 and not any("#" in name for name in by_file)
    for video in GOOD:
        pred = by_file[video]
        info = pred["video"]
        assert info["frame_rate"] == FPS and info["frames_processed"] == [0, 10, 20]
        frames = [(f["frame_number"], f) for f in info["frames"]]
        assert info["frame_number"] == deciding_frame(frames)
        assert pred["detections"] == dict(frames)[info["frame_number"]]["detections"]
        assert "failures" not in pred
    for bad in ("102MEDIA/CUT.MP4", "102MEDIA/JUNK.mp4"):
        assert by_file[bad]["failures"] == ["DETECTOR"] and "not a readable video" in by_file[bad]["failure_reason"]
    with open(out / "images.csv", newline="", encoding="utf-8") as fp:
        rows = {row["key"]: row for row in csv.DictReader(fp)}
    assert rows["102MEDIA/CUT.MP4"]["status"] == "failed" and "truncated" in rows["102MEDIA/CUT.MP4"]["reason"]
    assert all(rows[video]["status"] == "ok" for video in GOOD) and len(rows) == len(by_file)


def test_the_report_counts_each_video_once_and_shows_its_deciding_frame(video_run) -> None:
    """report.html: 7 media of which 5 videos (3 good, 2 failed), a thumbnail decoded from a video's frame."""
    import base64
    import html
    import io
    import re

    from PIL import Image

    card, out = video_run
    page = (out / "report.html").read_text()
    assert re.search(r'<b id="media-count">7</b>media \(5 videos\)', page)
    assert re.search(r'<tr data-kind="failed"><td>failed</td><td class="n">2</td>', page)
    shown = {html.unescape(key): data for data, key in
             re.findall(r'<img src="data:image/jpeg;base64,([^"]+)" data-key="([^"]+)"', page)}
    videos = [key for key in shown if key in GOOD]
    assert videos, sorted(shown)
    thumb = Image.open(io.BytesIO(base64.b64decode(shown[videos[0]])))
    assert thumb.width == 320 and abs(thumb.height / thumb.width - SIZE[1] / SIZE[0]) < 0.02


def test_camtrap_dp_has_one_media_row_per_video_and_validates(video_run) -> None:
    _, out = video_run
    errors, _ = _validate(out / "camtrap-dp" / "datapackage.json")
    assert not errors, errors
    with open(out / "camtrap-dp" / "media.csv", newline="", encoding="utf-8") as fp:
        media = {row["mediaID"]: row for row in csv.DictReader(fp)}
    with open(out / "camtrap-dp" / "observations.csv", newline="", encoding="utf-8") as fp:
        observations = list(csv.DictReader(fp))
    assert len(media) == 2 + len(GOOD) + 2
    for video, (_, mediatype) in GOOD.items():
        row = media[video]
        assert row["fileMediatype"] == mediatype and row["captureMethod"] == "activityDetection"
        assert row["fileName"] == Path(video).name
        rows = [o for o in observations if o["mediaID"] == video]
        assert rows and all(o["eventID"] == video and o["eventStart"] == row["timestamp"] for o in rows)
        spans = {(datetime.fromisoformat(o["eventEnd"]) - datetime.fromisoformat(o["eventStart"])).total_seconds()
                 for o in rows}
        assert spans == {2.0}  # frames 0..20 at 10 fps
    assert not [o for o in observations if o["mediaID"].startswith("102MEDIA/")]


def test_resume_redoes_only_new_or_changed_videos(tmp_path: Path, demo_bundle: Path) -> None:
    photos = sample_photos()
    card = make_card(tmp_path / "card", photos, broken=False)
    out = tmp_path / "out"
    args = ("run", str(card), "--bundle", str(demo_bundle), "--out", str(out), "--quiet", "--no-reclassify")
    run_cli(*args)
    first = _keys(out)
    write_clip(card / "101MEDIA" / "CLIP0004.mp4", photos[6])
    run_cli(*args)
    second = _keys(out)
    redone = {k for k in second if first.get(k) != second[k]}
    assert redone == {k for k in second if k.startswith("101MEDIA/CLIP0004.mp4#")} and len(redone) == 3
    clip = card / "100MEDIA" / "CLIP0001.mp4"
    write_clip(clip, photos[7], seconds=2)
    os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 10**9))
    run_cli(*args)
    third = _keys(out)
    redone = {k for k in third if second.get(k) != third[k]}
    assert redone == {"100MEDIA/CLIP0001.mp4#frame=000000&fps=10", "100MEDIA/CLIP0001.mp4#frame=000010&fps=10"}
    md = {e["file"]: e for e in json.loads((out / "megadetector.json").read_text())["images"]}
    assert md["100MEDIA/CLIP0001.mp4"]["frames_processed"] == [0, 10]  # frame 20 vanished with the old clip
    assert md["101MEDIA/CLIP0004.mp4"]["frames_processed"] == [0, 10, 20]


def test_photo_only_cards_write_what_they_wrote_before(tmp_path: Path, demo_bundle: Path, monkeypatch) -> None:
    photos = sample_photos()
    card = tmp_path / "card"
    (card / "100MEDIA").mkdir(parents=True)
    for photo in photos:
        shutil.copy2(photo, card / "100MEDIA" / photo.name)
    assert list(scan(card)) == list(scan(card, video_every=0.25, video_every_frames=3))
    out = tmp_path / "out"
    run_cli("run", str(card), "--bundle", str(demo_bundle), "--out", str(out), "--quiet", *DEPLOYMENT)
    names = ["predictions.json", "images.csv", "megadetector.json", "results.csv", "camtrap-dp/media.csv",
             "camtrap-dp/deployments.csv"]
    with_videos = {name: (out / name).read_bytes() for name in names}
    observations = _untimed(out / "camtrap-dp" / "observations.csv")
    from trapedge.runtime import station
    from trapedge.runtime.outputs import camtrap_dp, megadetector

    monkeypatch.setattr(station, "aggregate_videos", lambda predictions, images: (predictions, images))
    monkeypatch.setattr(megadetector, "video_fields", lambda pred: {})
    monkeypatch.setattr(megadetector, "video_detections", lambda pred: pred.get("detections") or [])
    monkeypatch.setattr(camtrap_dp, "video_event", lambda rows, pred, start: rows)
    station.write_outputs(out)
    assert {name: (out / name).read_bytes() for name in names} == with_videos
    assert _untimed(out / "camtrap-dp" / "observations.csv") == observations


def _untimed(path: Path) -> list[dict]:
    """Observation rows without classificationTimestamp (the time of writing)."""
    with open(path, newline="", encoding="utf-8") as fp:
        return [{k: v for k, v in row.items() if k != "classificationTimestamp"} for row in csv.DictReader(fp)]


def test_a_clip_cut_short_keeps_its_readable_frames_with_a_warning() -> None:
    def frame(n: int, status: str, reason: str = "", conf: float = 0.5) -> tuple[dict, dict]:
        key = f"100MEDIA/CLIP.AVI#frame={n:06d}&fps=10"
        pred = {"filepath": f"/card/{key}", "model_version": "v"}
        if status == "failed":
            pred.update(failures=["DETECTOR"], failure_reason=reason)
        else:
            pred["detections"] = [{"category": "1", "conf": conf, "bbox": [0.1, 0.1, 0.2, 0.2]}]
        return pred, {"key": key, "filepath": f"/card/{key}", "width": 320, "height": 240, "captured": None,
                      "status": status, "reason": reason or None, "modified_ns": 1}
    rows = [frame(0, "ok", conf=0.3), frame(10, "ok", conf=0.6), frame(20, "failed", "cannot decode frame 20"),
            frame(30, "vanished", conf=0.9)]
    predictions, images = aggregate_videos([r[0] for r in rows], [r[1] for r in rows])
    (pred,), (image,) = predictions, images
    assert pred["filepath"] == "/card/100MEDIA/CLIP.AVI" and image["key"] == "100MEDIA/CLIP.AVI"
    assert pred["video"]["frames_processed"] == [0, 10] and pred["video"]["frames_failed"] == [20]
    assert pred["video"]["frame_number"] == 10 and pred["detections"][0]["conf"] == 0.6
    assert image["status"] == "warning" and "1 of 3 sampled frames unreadable (frame 20" in image["reason"]
