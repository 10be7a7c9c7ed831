"""The library face: the README's example runs, and the CLI's outputs are the library's."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from trapedge.runtime.demo import build_demo_bundle, copy_samples

README = Path(__file__).parents[1] / "README.md"


def _readme_example() -> str:
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_on_the_demo_bundle(tmp_path: Path, monkeypatch, capsys) -> None:
    bundle = build_demo_bundle(tmp_path / "artifacts" / "speciesnet")
    card = copy_samples(tmp_path / "card")
    code = (_readme_example().replace('"artifacts/speciesnet"', repr(str(bundle)))
            .replace('"/media/SDCARD"', repr(str(card))).replace('country="NAM"', "country=None"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    images, detections = (int(x) for x in printed[0].split()[:2])
    out = tmp_path / "results" / "card-07"
    document = json.loads((out / "predictions.json").read_text())
    assert images == len(document["predictions"]) == 10
    assert detections == sum(len(p.get("detections", [])) for p in document["predictions"])
    assert (out / "camtrap-dp" / "deployments.csv").is_file()
    recorded = document["info"]["trapedge"]["reclassification"]["stages"]["target_precision"]
    assert recorded == pytest.approx(0.98)  # the reclassify call's override reached the outputs


def test_report_matches_the_outputs_and_a_rerun_resumes(tmp_path: Path) -> None:
    from trapedge.runtime import Station

    bundle = build_demo_bundle(tmp_path / "bundle")
    card = copy_samples(tmp_path / "card")
    station = Station(bundle, device="cpu")
    first = station.run(card, tmp_path / "out")
    assert first.processed == first.images == 10 and not first.failed
    document = json.loads((tmp_path / "out" / "predictions.json").read_text())
    labels: dict[str, int] = {}
    for prediction in document["predictions"]:
        for det in prediction.get("detections", []):
            if "processed_classification" in det:
                final = (det.get("reclassification") or det["processed_classification"])["class"]
                labels[final.split(";")[-1]] = labels.get(final.split(";")[-1], 0) + 1
    assert first.labels == labels
    assert {"detect", "classify", "write"} <= set(first.timing)
    assert {Path(p).name for p in first.written} >= {"predictions.json", "megadetector.json", "results.csv"}
    again = station.run(card, tmp_path / "out")
    assert again.processed == 0 and again.images == 10
    assert json.loads(json.dumps(again.to_dict()))["images"] == 10


def test_bad_settings_are_refused_before_any_work(tmp_path: Path) -> None:
    from trapedge.runtime import Station

    bundle = build_demo_bundle(tmp_path / "bundle")
    with pytest.raises(ValueError, match="event-pooling"):
        Station(bundle, stages={"decision": "calibrated"}, event_pooling=True)
    with pytest.raises(ValueError, match="centroids"):
        Station(bundle, centroids="bundle")
    station = Station(bundle)
    with pytest.raises(ValueError, match="not a folder"):
        station.run(bundle / "manifest.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_each_run_logs_to_its_own_folder_only(tmp_path: Path) -> None:
    import logging

    from trapedge.runtime import Station

    bundle = build_demo_bundle(tmp_path / "bundle")
    card = copy_samples(tmp_path / "card")
    station = Station(bundle, device="cpu")
    station.run(card, tmp_path / "first", limit=2, formats=("speciesnet",))
    logging.getLogger("trapedge").warning("written during the first card")
    station.run(card, tmp_path / "second", limit=2, formats=("speciesnet",))
    logging.getLogger("trapedge").warning("written during the second card")
    first = (tmp_path / "first" / "trapedge.log").read_text()
    second = (tmp_path / "second" / "trapedge.log").read_text()
    assert "written during the first card" in first and "written during the second card" not in first
    assert "written during the second card" in second and "written during the first card" not in second
    assert "detector" in first and "detector" in second  # both runs logged their own set-up


def test_max_classifications_per_image_caps_pass_one_and_a_resume_keeps_it(tmp_path: Path) -> None:
    from trapedge.runtime import Station

    bundle = build_demo_bundle(tmp_path / "bundle")
    card = copy_samples(tmp_path / "card")
    Station(bundle, device="cpu").run(card, tmp_path / "all", formats=("speciesnet",), reclassify=False)
    Station(bundle, device="cpu", max_classifications_per_image=1).run(
        card, tmp_path / "one", formats=("speciesnet",), reclassify=False)
    every = json.loads((tmp_path / "all" / "predictions.json").read_text())["predictions"]
    capped = json.loads((tmp_path / "one" / "predictions.json").read_text())["predictions"]
    assert any(sum("raw_classifications" in d for d in p.get("detections", [])) > 1 for p in every)
    for full, one in zip(every, capped):
        dets = one.get("detections", [])
        assert [d["bbox"] for d in dets] == [d["bbox"] for d in full.get("detections", [])]  # boxes unchanged
        classified = [d for d in dets if "raw_classifications" in d]
        eligible = [d for d in dets if d["conf"] >= 0.1]
        assert len(classified) == min(1, len(eligible))
        if classified:
            assert classified[0]["conf"] == max(d["conf"] for d in eligible)
            twin = next(d for d in full["detections"] if d["bbox"] == classified[0]["bbox"])
            assert classified[0]["raw_classifications"] == twin["raw_classifications"]
    with pytest.raises(ValueError) as refused:
        Station(bundle, device="cpu", max_classifications_per_image=2).run(card, tmp_path / "one")
    assert "\n" not in str(refused.value) and "max_classifications_per_image 1" in str(refused.value)
    again = Station(bundle, device="cpu", max_classifications_per_image=1).run(card, tmp_path / "one")
    assert again.processed == 0 and again.images == 10
    store = sqlite3.connect(tmp_path / "all" / "results.sqlite")  # as a store written before the setting was kept
    with store:
        store.execute("DELETE FROM meta WHERE key = 'pass1'")
    store.close()
    with pytest.raises(ValueError, match="max_classifications_per_image no cap"):
        Station(bundle, device="cpu", max_classifications_per_image=1).run(card, tmp_path / "all")
    with pytest.raises(ValueError, match="at least 1"):
        Station(bundle, device="cpu", max_classifications_per_image=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Station(bundle, device="cpu", detection_threshold_for_classification=1.5)
