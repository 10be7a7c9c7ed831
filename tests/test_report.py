"""The card report: its numbers from hand-built predictions, the page it writes, and the page in a real browser."""

from __future__ import annotations

import html
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trapedge.runtime.demo import build_demo_bundle, sample_photos
from trapedge.runtime.outputs import charts
from trapedge.runtime.outputs.report import REPORT_NAME, build_report, summarise
from trapedge.runtime.speciesnet.ensemble import Classification
from trapedge.runtime.station import FORMATS, Station, rerun_pass_two, write_outputs

from test_end_to_end import run_cli

FOX = "u1;mammalia;carnivora;canidae;vulpes;vulpes;red fox"
CANID = "u2;mammalia;carnivora;canidae;;;canidae"
BIRD = "u3;aves;;;;;aves"
RAVEN = "u4;aves;passeriformes;corvidae;corvus;corax;common raven"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


def _det(conf: float, label: str | None = None, category: str = "1", rec: dict | None = None,
         bbox: tuple = (0.1, 0.1, 0.2, 0.2)) -> dict:
    det = {"category": category, "conf": conf, "bbox": list(bbox)}
    if label is not None:
        det["processed_classification"] = {"class": label, "score": 0.9, "source": "classifier"}
    if rec is not None:
        det["reclassification"] = rec
    return det


def _media(key: str, detections: list[dict], captured: str | None = None, failed: str | None = None,
           video: dict | None = None) -> tuple[dict, dict]:
    pred: dict = {"filepath": f"/card/{key}", "detections": detections}
    if failed:
        pred = {"filepath": f"/card/{key}", "failures": ["DETECTOR"], "failure_reason": failed}
    if video:
        pred["video"] = video
    image = {"key": key, "filepath": f"/card/{key}", "captured": captured, "status": "failed" if failed else "ok",
             "reason": failed}
    return pred, image


def _card() -> tuple[list[dict], list[dict], dict]:
    calibrated = {"class": FOX, "original": CANID, "stage": "calibrated", "probability": 0.96,
                  "precision_bound": 0.97, "sources": ["centroid"]}
    birds = {"class": RAVEN, "original": Classification.BLANK.value, "stage": "birds", "aves_score": 0.8}
    accept = {"class": FOX, "original": FOX, "stage": "accept", "score": 0.95}
    rows = [
        _media("cam1/a.jpg", [_det(0.9, FOX, rec=accept), _det(0.8, FOX)], "2024-05-01T06:10:00"),
        _media("cam1/b.jpg", [_det(0.1, FOX)], "2024-05-03T06:59:00"),
        _media("cam2/c.jpg", [_det(0.7, CANID, rec=calibrated)], "2024-05-03T22:00:00"),
        _media("cam2/d.jpg", [_det(0.9, Classification.HUMAN.value, "2"), _det(0.5, BIRD)], "2024-05-03T06:30:00"),
        _media("cam2/e.jpg", [], "2024-05-04T10:00:00", failed="truncated JPEG"),
        _media("f.jpg", [_det(0.6, Classification.VEHICLE.value, "3")]),
        _media("cam2/g.jpg", [_det(0.5, Classification.BLANK.value)], "2024-05-04T01:00:00"),
        _media("cam1/h.jpg", [_det(0.6, Classification.BLANK.value, rec=birds)], "2024-05-05T12:00:00"),
        _media("cam1/clip.mp4", [_det(0.9, FOX)], "2024-05-05T12:05:00",
               video={"frame_rate": 10.0, "frames_processed": [0, 10], "frame_number": 10}),
    ]
    rows[-1][1].update(status="warning", reason="1 of 2 sampled frames unreadable")
    info = {"trapedge": {"version": "x", "reclassification": {
        "stages": {"decision": "calibrated"}, "notes": ["a note"],
        "calibration": {"levels": {"species": {"enabled": True, "lower_bound": 0.971, "accepted": 120,
                                               "threshold": 0.8},
                                   "genus": {"enabled": False, "reason": "too few views"}}}}}}
    return [p for p, _ in rows], [i for _, i in rows], info


def test_the_summary_counts_media_kinds_labels_time_folders_and_pass_two() -> None:
    predictions, images, info = _card()
    s = summarise(predictions, images, info, threshold=0.2)
    assert s["media"] == 9 and s["videos"] == 1
    assert s["detections"] == 9  # b's 0.1 box is below the threshold; e failed
    rates = {r["kind"]: r["media"] for r in s["rates"]}
    assert rates == {"animal": 5, "human": 1, "vehicle": 1, "unknown": 0, "blank": 2, "failed": 1}
    assert [(r["name"], r["detections"], r["media"], r["relabelled"], r["level"]) for r in s["species"]] == [
        ("red fox", 4, 3, 1, "species"), ("aves", 1, 1, 0, "class"), ("common raven", 1, 1, 1, "species")]
    assert s["species"][0]["scientific"] == "Vulpes vulpes"
    hours = dict(enumerate(s["hours"]))
    assert {h: n for h, n in hours.items() if n} == {6: 2, 22: 1, 12: 2}
    assert s["dates"] == [("2024-05-01", 1), ("2024-05-02", 0), ("2024-05-03", 2), ("2024-05-04", 0),
                          ("2024-05-05", 2)]
    assert s["undated"] == 1  # f.jpg; the failed e.jpg is not counted
    folders = {r["folder"]: r for r in s["folders"]}
    assert set(folders) == {"cam1", "cam2", "(card root)"}
    assert (folders["cam1"]["media"], folders["cam1"]["detections"], folders["cam1"]["animal"],
            folders["cam1"]["blank"]) == (4, 4, 3, 1)
    assert (folders["cam2"]["media"], folders["cam2"]["failed"], folders["cam2"]["blank"]) == (4, 1, 1)
    stages = {r["stage"]: r["detections"] for r in s["pass_two"]["stages"]}
    assert stages == {"accept": 1, "birds": 1, "score": 0, "calibrated": 1, "smoothing": 0}
    moves = {(m["from"], m["to"]): m["count"] for m in s["pass_two"]["moves"]}
    assert moves == {("canidae", "red fox"): 1, ("blank", "common raven"): 1}
    assert [c["enabled"] for c in s["pass_two"]["calibration"]] == [True, False]
    assert s["failures"] == [{"key": "cam2/e.jpg", "reason": "truncated JPEG"}]
    assert s["warnings"] == [{"key": "cam1/clip.mp4", "reason": "1 of 2 sampled frames unreadable"}]


def test_a_lower_threshold_counts_the_faint_box_and_no_pass_two_is_said() -> None:
    predictions, images, info = _card()
    s = summarise(predictions, images, {}, threshold=0.05)
    assert s["detections"] == 10
    assert {r["kind"]: r["media"] for r in s["rates"]}["animal"] == 6
    assert s["pass_two"] is None
    assert "did not run" in build_report(predictions, images, {}, Path("/card"), threshold=0.05)


def test_a_camera_clock_reset_to_2000_keeps_the_date_chart_small() -> None:
    predictions, images = [], []
    for when in ("2000-01-01T00:00:00", "2024-06-01T12:00:00"):
        pred, image = _media(f"cam/{when[:4]}.jpg", [_det(0.9, FOX)], when)
        predictions.append(pred)
        images.append(image)
    dates = summarise(predictions, images, {}, 0.2)["dates"]
    assert len(dates) <= 120 and sum(n for _, n in dates) == 2 and dates[0][0] == "11 weeks from 2000-01-01"


def test_a_video_holds_the_people_of_every_frame_and_drop_leaves_it_out(tmp_path: Path) -> None:
    """A person in a frame other than the deciding one: counted as human, and the clip not shown under drop."""
    from trapedge.runtime.outputs.video import aggregate_videos
    import cv2

    clip = tmp_path / "card" / "cam" / "clip.mp4"
    clip.parent.mkdir(parents=True)
    frame = cv2.resize(cv2.imread(str(sample_photos()[0])), (320, 240))
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    for _ in range(20):
        writer.write(frame)
    writer.release()
    fox, person = _det(0.95, FOX), _det(0.9, Classification.HUMAN.value, "2", bbox=(0.5, 0.4, 0.2, 0.5))
    frames = [(0, [fox]), (10, [person])]
    predictions = [{"filepath": str(clip) + f"#frame={n:06d}&fps=10", "detections": d} for n, d in frames]
    images = [{"key": f"cam/clip.mp4#frame={n:06d}&fps=10", "filepath": p["filepath"], "captured": None,
               "status": "ok", "reason": None, "width": 320, "height": 240} for (n, _), p in zip(frames, predictions)]
    predictions, images = aggregate_videos(predictions, images)
    assert predictions[0]["video"]["frame_number"] == 0 and predictions[0]["detections"] == [fox]
    rates = {r["kind"]: r["media"] for r in summarise(predictions, images, {}, 0.2)["rates"]}
    assert rates["human"] == 1 and rates["animal"] == 1
    assert 'data-key="cam/clip.mp4"' in build_report(predictions, images, {}, tmp_path, privacy="blur")
    assert 'data-key="cam/clip.mp4"' not in build_report(predictions, images, {}, tmp_path, privacy="drop")


def test_a_dollar_in_a_folder_or_label_is_text_and_a_zero_threshold_is_kept() -> None:
    predictions, images, info = _card()
    pred, image = _media("site $a^$/x.jpg", [_det(0.9, "u9;mammalia;;;;;$\\foo$ cat")])
    page = build_report(predictions + [pred], images + [image], info, Path("/card"), threshold=0.0)
    assert "site $a^$" in page and "confidence 0.0 " in page
    info["trapedge"]["detector"] = {"typical_detection_threshold": 0.0}
    assert "confidence 0.0 " in build_report(predictions, images, info, Path("/card"))


def test_long_seasons_are_charted_by_week() -> None:
    predictions, images = [], []
    for day in (0, 200):
        pred, image = _media(f"cam/{day}.jpg", [_det(0.9, FOX)], f"2024-{1 + day // 31:02d}-01T12:00:00")
        predictions.append(pred)
        images.append(image)
    dates = summarise(predictions, images, {}, 0.2)["dates"]
    assert dates[0] == ("week of 2024-01-01", 1) and all(d.startswith("week of") for d, _ in dates)
    assert sum(n for _, n in dates) == 2 and len(dates) < 40


def _attributes(page: str) -> list[str]:
    return re.findall(r'\b(?:src|href|xlink:href)="([^"]*)"', page)


def test_the_page_is_offline_escaped_and_charted(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the report extra draws the charts")
    predictions, images, info = _card()
    pred, image = _media("cam3/<script>alert(1)</script>.jpg", [], failed="<img src=x onerror=alert(2)>")
    page = build_report(predictions + [pred], images + [image], info, Path("/card"))
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert all(v.startswith(("data:", "#")) for v in _attributes(page)), _attributes(page)
    assert page.count("<svg") == 4  # species, hours, dates, folders
    assert "Charts need matplotlib" not in page


def test_without_matplotlib_the_tables_stay_and_the_page_says_how_to_get_charts(monkeypatch) -> None:
    monkeypatch.setattr(charts, "available", lambda: False)
    predictions, images, info = _card()
    page = build_report(predictions, images, info, Path("/card"))
    assert "<svg" not in page and 'pip install "trapedge[report]"' in page
    assert page.count('<tr data-label="') == 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The demo bundle over the ten real photos in two camera folders, and a copy of one photo as a failure."""
    root = tmp_path_factory.mktemp("report")
    bundle = build_demo_bundle(root / "bundle")
    card = root / "card"
    for index, photo in enumerate(sample_photos()):
        folder = card / "DCIM" / ("100RECNX" if index < 6 else "101RECNX")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, folder / photo.name)
    (card / "DCIM" / "101RECNX" / "BROKEN.JPG").write_bytes(b"not a photo")
    (card / "DCIM" / "101RECNX" / "TRUNCATED.JPG").write_bytes(sample_photos()[0].read_bytes()[:200_000])
    out = root / "out"
    report = Station(bundle).run(card, out, log=lambda m: None)
    assert out / REPORT_NAME in report.written
    return bundle, card, out


def _expected_species(out: Path) -> dict[str, int]:
    """Detections per animal label, read straight from predictions.json at the detector's typical threshold."""
    import json

    from trapedge.runtime.outputs.taxa import final, observation_type

    data = json.loads((out / "predictions.json").read_text())
    threshold = (data["info"]["trapedge"].get("detector") or {}).get("typical_detection_threshold", 0.2)
    counts: Counter = Counter()
    for pred in data["predictions"]:
        for det in pred.get("detections") or []:
            label = final(det).label
            if det["conf"] >= threshold and observation_type(label, det["category"]) == "animal":
                counts[label] += 1
    return dict(counts)


def test_run_writes_the_report_and_no_report_leaves_it_out(demo_run, tmp_path: Path) -> None:
    bundle, card, out = demo_run
    page = (out / REPORT_NAME).read_text()
    rows = dict(re.findall(r'<tr data-label="([^"]+)">.*?<td class="n detections">(\d+)</td>', page))
    assert {html.unescape(k): int(v) for k, v in rows.items()} == _expected_species(out)
    assert page.count('<img src="data:image/jpeg;base64,') >= 3
    assert "BROKEN.JPG" in page and "101RECNX" in page
    truncated = re.search(r'<table id="warnings-table">.*?</table>', page, re.S)
    assert truncated and "TRUNCATED.JPG" in truncated.group(0) and "truncated JPEG" in truncated.group(0)
    Station(bundle).run(card, tmp_path / "plain", formats=tuple(f for f in FORMATS if f != "report"),
                        log=lambda m: None)
    assert not (tmp_path / "plain" / REPORT_NAME).exists()
    run_cli("run", str(card), "--bundle", str(bundle), "--out", str(tmp_path / "cli"), "--no-report", "--quiet")
    assert not (tmp_path / "cli" / REPORT_NAME).exists() and (tmp_path / "cli" / "predictions.json").exists()
    proc = run_cli("report", str(tmp_path / "cli"), "--privacy", "drop")
    assert (tmp_path / "cli" / REPORT_NAME).exists() and "report.html" in proc.stderr
    assert "People: drop (media with people left out)" in (tmp_path / "cli" / REPORT_NAME).read_text()
    rerun_pass_two(tmp_path / "cli")  # rewrites the report under the stricter mode the report command recorded
    assert "People: drop (media with people left out)" in (tmp_path / "cli" / REPORT_NAME).read_text()
    write_outputs(tmp_path / "cli", ("report",), privacy="blur")  # asked for once, not remembered
    assert "People: blur" in (tmp_path / "cli" / REPORT_NAME).read_text()
    rerun_pass_two(tmp_path / "cli")
    assert "People: drop" in (tmp_path / "cli" / REPORT_NAME).read_text()


def test_reclassify_rewrites_the_report_with_the_new_decision(demo_run, tmp_path: Path) -> None:
    _, _, out = demo_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    assert "Decision: calibrated." in (copy / REPORT_NAME).read_text()
    rerun_pass_two(copy, stages={"decision": "adaptive"})
    assert "Decision: adaptive." in (copy / REPORT_NAME).read_text()
    (copy / REPORT_NAME).unlink()
    rerun_pass_two(copy)
    assert not (copy / REPORT_NAME).exists()  # pass 2 rewrites a report the run has, never adds one
    assert write_outputs(copy, ("report",)) == [copy / REPORT_NAME]


def _chromium() -> str | None:
    return os.environ.get("TRAPEDGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_report_in_headless_chromium(demo_run, tmp_path: Path) -> None:
    """Loads with no console error and no request but itself, renders charts and photos, and its species table
    is predictions.json's."""
    playwright = pytest.importorskip("playwright.sync_api", reason="the dev extra installs playwright")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    _, _, out = demo_run
    url = (out / REPORT_NAME).resolve().as_uri()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 900})
            messages, errors, requests = [], [], []
            page.on("console", lambda m: messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            images_ok = page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            image_count = page.evaluate("document.images.length")
            svgs = page.evaluate("Array.from(document.querySelectorAll('svg')).map(s => s.getBoundingClientRect()"
                                 ".width)")
            rows = page.evaluate("Array.from(document.querySelectorAll('#species-table tbody tr')).map(r => "
                                 "[r.dataset.label, Number(r.querySelector('.detections').textContent)])")
            media = page.inner_text("#media-count")
        finally:
            browser.close()
    assert not errors and not [m for m in messages if m[0] in ("error", "warning")], (errors, messages)
    assert all(u == url or u.startswith("data:") for u in requests), requests
    assert images_ok and image_count >= 3
    assert len(svgs) == 4 and min(svgs) > 300
    assert dict(rows) == _expected_species(out) and rows
    import json
    assert int(media) == len(json.loads((out / "predictions.json").read_text())["predictions"]) == 12

    from PIL import Image
    grey = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert grey.shape[0] > 2000 and grey.std() > 20, (grey.shape, grey.std())
    assert (grey < 128).mean() > 0.05  # text, bars and photos, not an empty white page
