"""Calibrated pass 2 on generated cards with a known answer: it reaches its precision target, refuses when it
cannot, carries its evidence, and pass 1 stores what calibration needs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

import test_stages as ts
from cards import ANIMAL, make_card, hierarchically_right
from test_reclassify import make_bundle, scenario
from trapedge.runtime.models.bundle import Bundle
from trapedge.runtime.outputs import ImageInfo, write_camtrap_dp, write_flat_csv, write_megadetector_json, Deployment
from trapedge.runtime.reclassify import PassTwoInputs, StageConfig, pass_two
from trapedge.runtime.reclassify.calibrate import (
    _log_binom_tail, acceptance_threshold, clopper_pearson_lower, fit_logistic, grouped_folds,
)
from trapedge.runtime.reclassify.degrade import ReferenceSampler, background_patch, crop_quality, render_views
from trapedge.runtime.reclassify.runner import Reclassifier


def _score(card, result) -> dict:
    relabels = [(k, d) for k, d in result.decisions.items() if d["stage"] != "accept"]
    right = [hierarchically_right(d["class"], card.truth[k]) for k, d in relabels]
    unknown = [k for k, t in card.truth.items() if t in card.unknown]
    forced = [k for k, d in relabels if card.truth[k] in card.unknown and d["level"] == "species"]
    return {"relabels": len(relabels), "right": sum(right), "forced": len(forced), "unknown": len(unknown)}


def test_calibrated_pass_two_reaches_its_target_on_cards_with_a_known_answer() -> None:
    totals = {"relabels": 0, "right": 0, "forced": 0, "unknown": 0}
    for seed in range(3):
        card = make_card(seed)
        result = pass_two(card.inputs, card.taxonomy_map, lambda _: True, StageConfig())
        enabled = {lev: c for lev, c in result.calibration["levels"].items() if c["enabled"]}
        assert enabled, result.notes
        for cal in enabled.values():
            assert cal["lower_bound"] >= 0.95 and cal["precision"] >= cal["lower_bound"]
            assert clopper_pearson_lower(cal["correct"], cal["accepted"]) == pytest.approx(cal["lower_bound"])
        for name, value in _score(card, result).items():
            totals[name] += value
    assert totals["relabels"] >= 100  # it does re-label: the cards hold 3 x ~130 coarse animals it can resolve
    assert totals["right"] / totals["relabels"] >= 0.95, totals
    assert totals["forced"] <= 0.02 * totals["unknown"], totals


def test_calibrated_pass_two_refuses_when_the_evidence_is_noise() -> None:
    card = make_card(0, informative=False)
    result = pass_two(card.inputs, card.taxonomy_map, lambda _: True, StageConfig())
    assert [d for d in result.decisions.values() if d["stage"] != "accept"] == []
    assert all(not c["enabled"] for c in result.calibration["levels"].values())
    assert any("switched off" in note for note in result.notes)
    adaptive = pass_two(card.inputs, card.taxonomy_map, lambda _: True, StageConfig(decision="adaptive"))
    assert _score(card, adaptive)["relabels"] > 0  # the old rule would have guessed on the same card


def test_calibrated_pass_two_without_degraded_views_says_why() -> None:
    card = make_card(1)
    inputs = PassTwoInputs(card.inputs.predictions, card.inputs.embeddings, card.inputs.evidence, None,
                           card.inputs.events)
    result = pass_two(inputs, card.taxonomy_map, lambda _: True, StageConfig())
    assert result.counts["score"] == 0 and result.counts["accept"] > 0
    assert "no degraded reference views" in result.notes[0]


def test_a_higher_target_accepts_less_and_every_decision_carries_its_evidence() -> None:
    card = make_card(2)
    loose = pass_two(card.inputs, card.taxonomy_map, lambda _: True, StageConfig(target_precision=0.9))
    strict = pass_two(card.inputs, card.taxonomy_map, lambda _: True, StageConfig(target_precision=0.99))
    assert _score(card, strict)["relabels"] <= _score(card, loose)["relabels"]
    decided = [d for d in loose.decisions.values() if d["stage"] == "calibrated"]
    assert decided
    for d in decided:
        assert d["precision_bound"] >= 0.9 and d["calibrated_on"] > 0 and d["probability"] >= d["threshold"]
        assert set(d["evidence"]) == {"burst", "embedding", "speciesnet", "quality"}
        assert set(d["sources"]) <= {"burst", "embedding", "speciesnet"} and d["original"] == ANIMAL
        assert json.loads(json.dumps(d)) == d


def test_geofence_blocks_calibrated_labels() -> None:
    card = make_card(0)
    free = pass_two(card.inputs, card.taxonomy_map, lambda _: True, StageConfig())
    blocked = {d["class"] for d in free.decisions.values() if d["stage"] == "calibrated" and d["level"] == "species"}
    assert blocked
    victim = sorted(blocked)[0]
    fenced = pass_two(card.inputs, card.taxonomy_map, lambda label: label != victim, StageConfig())
    assert victim not in {d["class"] for d in fenced.decisions.values() if d["stage"] != "accept"}


def test_unknown_species_stay_coarse_when_their_own_centroid_is_missing() -> None:
    card = make_card(3, unknown_share=0.3)
    result = pass_two(card.inputs, card.taxonomy_map, lambda _: True, StageConfig())
    score = _score(card, result)
    assert score["unknown"] > 0 and score["forced"] <= max(1, int(0.02 * score["unknown"]))


def test_clopper_pearson_bound_is_the_binomial_tail_quantile() -> None:
    assert clopper_pearson_lower(59, 59) == pytest.approx(0.05 ** (1 / 59))
    for k, n in ((90, 100), (5, 9), (400, 410)):
        lower = clopper_pearson_lower(k, n)
        assert math.exp(_log_binom_tail(k, n, lower)) == pytest.approx(0.05, rel=1e-4)
    assert clopper_pearson_lower(90, 100) < clopper_pearson_lower(91, 100) < 0.91
    assert clopper_pearson_lower(0, 10) == 0.0


def test_acceptance_threshold_takes_the_largest_set_that_reaches_the_bound() -> None:
    probs = np.linspace(1.0, 0.0, 200)
    correct = np.ones(200, dtype=bool)
    correct[150:] = False  # the 50 least probable are wrong
    found = acceptance_threshold(probs, correct, 0.95)
    assert found["correct"] == 150 and found["accepted"] == 150 and found["lower_bound"] >= 0.95
    assert acceptance_threshold(probs[:40], correct[:40], 0.95) is None  # 40 hits cannot certify 0.95
    assert acceptance_threshold(probs, ~correct, 0.95) is None


def test_logistic_fit_recovers_known_probabilities() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2))
    truth = 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0)))
    y = rng.random(20000) < truth
    model = fit_logistic(x, y, ridge=0.0)
    assert np.abs(model.predict(x) - truth).max() < 0.05
    folds = grouped_folds(["a", "a", "b", "c", "c", "d"], 2)
    assert folds[0] == folds[1] and folds[3] == folds[4]


def test_event_pooling_changes_a_decision_in_a_multi_member_group(tmp_path: Path) -> None:
    predictions, table, _ = scenario()
    lion = ts._directions()[ts.LION]
    noise = np.random.default_rng(7).normal(size=ts.DIM)
    far = lion + 0.3 * noise / np.linalg.norm(noise)  # a hard view of the same lion: alone only to genus
    predictions[1]["detections"].append(copy.deepcopy(predictions[1]["detections"][0]))  # also "animal"
    table.filepaths.append("/card/coarse.jpg")
    table.detections = np.append(table.detections, len(predictions[1]["detections"]) - 1)
    table.vectors = np.vstack([table.vectors, far[None].astype(np.float32)])
    events = {"/card/refs.jpg": "e0", "/card/coarse.jpg": "e1"}
    config = StageConfig(decision="adaptive")
    alone = copy.deepcopy(predictions)
    Reclassifier(Bundle.load(make_bundle(tmp_path / "a")), config, events=events).run(alone, table)
    pooled = copy.deepcopy(predictions)
    Reclassifier(Bundle.load(make_bundle(tmp_path / "b")), config, events=events,
                 event_pooling=True).run(pooled, table)
    assert alone[1]["detections"][0]["reclassification"]["class"] == ts.LION
    assert alone[1]["detections"][-1]["reclassification"]["class"] == ts.PANTHERA
    assert pooled[1]["detections"][-1]["reclassification"]["class"] == ts.LION  # pooled with its event-mate
    with pytest.raises(ValueError, match="adaptive or nearest"):
        Reclassifier(Bundle.load(make_bundle(tmp_path / "c")), StageConfig(), event_pooling=True)


def test_smoothing_reaches_every_exported_format_as_counted(tmp_path: Path) -> None:
    card = make_card(0)
    predictions = copy.deepcopy(card.inputs.predictions)
    result = pass_two(card.inputs, card.taxonomy_map, lambda _: True, StageConfig(decision="smoothing"))
    result.apply(predictions)
    counted = result.counts["smoothing"]
    assert counted > 0
    infos = {p["filepath"]: ImageInfo(p["filepath"][len("/card/"):], p["filepath"], 2048, 1440,
                                      "2024-01-01T00:00:00") for p in predictions}
    write_megadetector_json(tmp_path / "md.json", predictions, infos, info={})
    md = json.loads((tmp_path / "md.json").read_text())
    assert md["info"]["classifier_metadata"]["reclassified_by_stage"]["smoothing"] == counted
    write_flat_csv(tmp_path / "flat.csv", predictions, infos)
    rows = (tmp_path / "flat.csv").read_text().splitlines()
    assert sum("smoothing" in row for row in rows[1:]) == counted
    (tmp_path / "dp").mkdir()
    write_camtrap_dp(tmp_path / "dp", predictions, infos,
                     Deployment.from_dict({"timezone": "UTC", "latitude": 0.0, "longitude": 0.0,
                                           "deployment_id": "d"}), info={})
    observations = (tmp_path / "dp" / "observations.csv").read_text()
    assert observations.count("burst smoothing") == counted


def test_render_views_are_degraded_like_hard_crops() -> None:
    rng = np.random.default_rng(0)
    crop = (rng.random((300, 200, 3)) * 255).astype(np.uint8)
    views = render_views(crop, rng, sides=[12.0, 20.0], views=8)
    assert len(views) == 8 and {k for v in views for k in v.kinds} == {"small", "grey", "dark", "cut"}
    for v in views:
        if "small" in v.kinds:
            assert min(v.pixels.shape[:2]) <= 21 and v.side_px in (12.0, 20.0)
        if "grey" in v.kinds:
            assert np.abs(v.pixels[..., 0].astype(int) - v.pixels[..., 1]).max() == 0
        if "dark" in v.kinds and "small" not in v.kinds:
            assert v.pixels.mean() < crop.mean() * 0.95
        if "cut" in v.kinds and "small" not in v.kinds:
            assert v.pixels.shape[0] * v.pixels.shape[1] <= 0.76 * 300 * 200
    quality = crop_quality(np.full((10, 10, 3), 128, dtype=np.uint8), 10)
    assert quality.tolist() == pytest.approx([10.0, 128 / 255, 0.0])
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    image[:50] = 255
    patch = background_patch(image, [[0.0, 0.0, 1.0, 0.5]], (0.2, 0.2), rng)
    assert patch is not None and patch.max() == 0  # never inside the box
    assert background_patch(image, [[0.0, 0.0, 1.0, 1.0]], (0.2, 0.2), rng) is None
    sampler = ReferenceSampler(2, {"a": 1})
    assert [sampler.take("a"), sampler.take("a"), sampler.take("b")] == [True, False, True]


def test_pass_one_stores_degraded_reference_views_and_pass_two_calibrates_on_them(bundle: Path, photos,
                                                                                   tmp_path: Path) -> None:
    from test_end_to_end import run_cli
    from trapedge.runtime.reclassify.stages import accept
    from trapedge.runtime.outputs.store import STORE_NAME, Store

    stages = tmp_path / "stages.json"
    stages.write_text(json.dumps({"degraded_per_label": 2, "degraded_views": 2, "tau_accept": 0.3}))
    out = tmp_path / "out"
    proc = run_cli("run", str(photos[0].parent), "--bundle", str(bundle), "--out", str(out), "--stages-config",
                   str(stages))
    store = Store(out / STORE_NAME)
    root = Path(store.get_meta("dump_root"))
    views = store.degraded(root)
    evidence = store.evidence(root)
    embeddings = store.embeddings(root)
    predictions = {p["filepath"]: p for p in store.predictions(root)}
    assert len(views.labels) > 0, proc.stderr[-2000:]
    assert sorted(zip(evidence.filepaths, evidence.detections.tolist())) == sorted(
        zip(embeddings[0], embeddings[1].tolist()))  # every embedded detection has its evidence
    assert all(len(t) == 5 for t in evidence.top_classes) and evidence.quality.shape[1] == 3
    per_label: dict[str, set] = {}
    for fp, det, label, kind in zip(views.filepaths, views.detections, views.labels, views.kinds):
        processed = predictions[fp]["detections"][int(det)]["processed_classification"]
        config = StageConfig(tau_accept=0.3)
        assert accept([processed["class"]], np.array([processed["score"]]), [processed["source"]], config)[0]
        if kind == "background":
            assert label == ts.Classification.BLANK.value
        else:
            assert label == processed["class"] and set(kind.split("+")) <= {"small", "grey", "dark", "cut"}
            per_label.setdefault(label, set()).add((fp, int(det)))
    assert max(len(v) for v in per_label.values()) <= 2  # degraded_per_label
    assert views.vectors.shape[1] == embeddings[2].shape[1]
    before = len(views.labels)
    store.close()
    info = json.loads((out / "predictions.json").read_text())["info"]["trapedge"]["reclassification"]
    assert info["stages"]["decision"] == "calibrated" and set(info["calibration"]["levels"]) == {
        "species", "genus", "family", "order", "class"}
    assert "calibration" in info and info["calibration"]["rows"]["views"] > 0
    again = run_cli("run", str(photos[0].parent), "--bundle", str(bundle), "--out", str(out), "--stages-config",
                    str(stages))
    store = Store(out / STORE_NAME)
    assert len(store.degraded(root).labels) == before  # resumed: nothing re-rendered
    store.close()
    assert "species:" in again.stderr  # the summary says what each calibrated level did
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("## Pass 2 from Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    example = example.replace('"results/results.sqlite"', repr(str(out / STORE_NAME)))
    example = example.replace('"artifacts/speciesnet"', repr(str(bundle)))
    printed: list = []
    exec(compile(example, "README.md", "exec"), {"print": lambda *a: printed.append(a)})  # the README's example runs
    counts, species, notes = printed[0]
    assert counts["accept"] > 0 and "enabled" in species and isinstance(notes, list)
