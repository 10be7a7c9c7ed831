"""Pass 2 end to end on fabricated predictions: reclassification objects, geofence, evaluate, lean CLI."""

from __future__ import annotations

import copy
from types import SimpleNamespace
import csv
import json
from pathlib import Path

import numpy as np
import pytest

import test_stages as ts
from fixtures_models import data_bundle
from test_end_to_end import run_cli
from trapedge.runtime.models.bundle import Bundle
from trapedge.runtime.reclassify.evaluate import evaluate
from trapedge.runtime.outputs.store import STORE_NAME, Store
from trapedge.runtime.reclassify import EmbeddingTable
from trapedge.runtime.reclassify.runner import Reclassifier
from trapedge.runtime.reclassify.stages import StageConfig

ADAPTIVE = StageConfig(decision="adaptive")


def make_bundle(root: Path, geofence: dict | None = None) -> Path:
    """A bundle with only taxonomy, geofence and labels (the taxonomy of test_stages): enough for pass 2."""
    return data_bundle(root, ts.TAXONOMY, geofence=geofence)


def _det(label: str, score: float, source: str = "classifier", conf: float = 0.9, aves: float = 0.0) -> dict:
    classes = [label, ts.OSTRICH] if aves else [label]
    scores = [score, aves] if aves else [score]
    return {"category": "1", "label": "animal", "conf": conf, "bbox": [0.1, 0.1, 0.2, 0.2],
            "raw_classifications": {"classes": classes, "scores": scores},
            "processed_classification": {"class": label, "score": score, "source": source}}


def scenario() -> tuple[list[dict], EmbeddingTable, dict[tuple[str, int], str]]:
    """References for lion, leopard and jackal, then coarse detections with known truth."""
    vecs, labels = ts._refs({ts.LION: 6, ts.LEOPARD: 6, ts.JACKAL: 6}, noise=0.03)
    predictions = [{"filepath": "/card/refs.jpg", "detections": [_det(lab, 0.95) for lab in labels]}]
    coarse = [
        (_det(ts.Classification.ANIMAL.value, 0.7, "detector"), ts._near(ts.LION, 0.02, 1), ts.LION),
        (_det(ts.MAMMAL, 0.7, "classifier+rollup_to_class"), ts._near(ts.JACKAL, 0.02, 2), ts.JACKAL),
        (_det(ts.FELID, 0.7, "classifier+rollup_to_family"), ts._near(ts.LEOPARD, 0.02, 3), ts.LEOPARD),
        (_det(ts.Classification.BLANK.value, 0.9, conf=0.5, aves=0.6), ts._near(ts.OSTRICH, 0.02, 4), ts.OSTRICH),
        (_det(ts.Classification.BLANK.value, 0.9, conf=0.15), ts._near(ts.LION, 0.02, 5), ts.LION),
        (_det(ts.PANTHERA, 0.5, "classifier+rollup_to_genus"), ts._near(ts.OSTRICH, 0.02, 6), ts.OSTRICH),
    ]
    predictions.append({"filepath": "/card/coarse.jpg", "detections": [d for d, _, _ in coarse]})
    table = EmbeddingTable(["/card/refs.jpg"] * len(labels) + ["/card/coarse.jpg"] * len(coarse),
                           np.array(list(range(len(labels))) + list(range(len(coarse)))),
                           np.vstack([vecs] + [v[None] for _, v, _ in coarse]).astype(np.float32))
    truth = {("/card/coarse.jpg", i): t for i, (_, _, t) in enumerate(coarse)}
    truth.update({("/card/refs.jpg", i): lab for i, lab in enumerate(labels)})
    return predictions, table, truth


def test_pass_two_touches_what_it_should_and_keeps_speciesnet_fields(tmp_path: Path) -> None:
    predictions, table, truth = scenario()
    before = copy.deepcopy(predictions)
    counts = Reclassifier(Bundle.load(make_bundle(tmp_path / "b")), ADAPTIVE).run(predictions, table)
    assert counts == {"accept": 18, "birds": 1, "score": 3, "smoothing": 0, "candidates": 5}
    coarse = predictions[1]["detections"]
    got = [d.get("reclassification") for d in coarse]
    assert got[0]["class"] == ts.LION and got[0]["stage"] == "score" and got[0]["level"] == "species"
    assert got[1]["class"] == ts.JACKAL and got[2]["class"] == ts.LEOPARD
    assert got[3]["stage"] == "birds" and got[3]["class"] == ts.BIRD and got[3]["aves_score"] == 0.6
    assert got[4] is None  # a blank below the detector floor stays blank
    assert got[5] is None  # an ostrich SpeciesNet called "panthera" cannot leave panthera
    for key in ("distance", "threshold", "runner_up", "margin", "original", "scoring"):
        assert key in got[0]
    assert got[0]["original"] == ts.Classification.ANIMAL.value and got[0]["distance"] <= got[0]["threshold"]
    for old, new in zip(before, predictions):
        for a, b in zip(old["detections"], new["detections"]):
            b = {k: v for k, v in b.items() if k != "reclassification"}
            assert a == b
    result = evaluate(predictions, truth)
    assert result["reclassified"] == 4 and result["accuracy"] == 1.0
    assert result["bird_override"] == {"count": 1, "accuracy": 1.0}
    assert result["species_level_share"] == 1.0


def test_geofence_keeps_blocked_species_out(tmp_path: Path) -> None:
    predictions, table, _ = scenario()
    leopard_key = ";".join(ts.LEOPARD.split(";")[1:6])
    bundle = make_bundle(tmp_path / "b", {leopard_key: {"block": {"KEN": [], "USA": ["AK"]}}})  # USA: only Alaska
    Reclassifier(Bundle.load(bundle), ADAPTIVE, country="KEN").run(predictions, table)
    rec = predictions[1]["detections"][2].get("reclassification")
    assert rec is None or rec["class"] != ts.LEOPARD
    Reclassifier(Bundle.load(bundle), ADAPTIVE, country="USA").run(predictions, table)
    assert predictions[1]["detections"][2]["reclassification"]["class"] == ts.LEOPARD


def test_unknown_species_counted_when_forced(tmp_path: Path) -> None:
    predictions, table, truth = scenario()
    Reclassifier(Bundle.load(make_bundle(tmp_path / "b")), StageConfig(lam=100, t_max=2.0, margin=0.0, decision="adaptive")).run(
        predictions, table)
    truth[("/card/coarse.jpg", 0)] = "x;mammalia;carnivora;felidae;panthera;tigris;tiger"
    result = evaluate(predictions, truth)
    assert result["unknown_species"]["forced_into_known"] >= 1


def fill_store(path: Path, predictions: list[dict], table: EmbeddingTable, root: Path) -> None:
    """Writes fabricated pass-1 results into a results store, as `trapedge run` would."""
    store = Store(path)
    store.set_meta("dump_root", str(root))
    for pred in predictions:
        key = Path(pred["filepath"]).relative_to(root).as_posix()
        embeddings = {int(d): v for fp, d, v in zip(table.filepaths, table.detections, table.vectors)
                      if fp == pred["filepath"]}
        store.put(SimpleNamespace(record=SimpleNamespace(key=key, size=1, mtime_ns=1), prediction=pred,
                                  status="ok", width=100, height=100, captured=None, error=None, warnings=[],
                                  embeddings=embeddings, evidence={}, degraded=[]))
    store.close()


def test_reclassify_and_evaluate_commands(tmp_path: Path) -> None:
    predictions, table, truth = scenario()
    bundle = make_bundle(tmp_path / "b")
    out = tmp_path / "out"
    out.mkdir()
    fill_store(out / STORE_NAME, predictions, table, Path("/card"))
    store = Store(out / STORE_NAME)
    store.set_meta("pass2", json.dumps({"stages": StageConfig(decision="adaptive").to_dict(),
                                        "burst_gap": 30.0, "event_pooling": False}))
    store.close()
    proc = run_cli("reclassify", str(out), "--bundle", str(bundle), "--decision", "calibrated")
    assert "'score': 0" in proc.stderr and "no degraded reference views" in proc.stderr
    assert "no EXIF capture time" in proc.stderr and "file modification time" in proc.stderr
    proc = run_cli("reclassify", str(out), "--bundle", str(bundle))  # the run's own settings: adaptive, USA
    assert "'score': 3" in proc.stderr
    document = json.loads((out / "predictions.json").read_text())
    assert document["info"]["trapedge"]["reclassification"]["counts"]["birds"] == 1
    assert document["info"]["trapedge"]["reclassification"]["stages"]["decision"] == "adaptive"
    with open(tmp_path / "truth.csv", "w", newline="") as fp:
        writer = csv.writer(fp)
        writer.writerow(["filepath", "detection", "label"])
        writer.writerows([fp_, idx, label] for (fp_, idx), label in truth.items())
    proc = run_cli("evaluate", str(out), "--truth", str(tmp_path / "truth.csv"))
    assert "accuracy of re-classified | 100.0%" in proc.stdout
    assert json.loads((out / "evaluation.json").read_text())["reclassified"] == 4
    bad = run_cli("evaluate", str(out), "--truth", str(bundle / "labels.txt"), check=False)
    assert bad.returncode == 2 and "truth CSV needs columns" in bad.stderr


def test_reclassify_reuses_the_runs_location_unless_overridden(tmp_path: Path) -> None:
    predictions, table, _ = scenario()
    leopard_key = ";".join(ts.LEOPARD.split(";")[1:6])
    bundle = make_bundle(tmp_path / "b", {leopard_key: {"block": {"KEN": [], "USA": ["AK"]}}})  # USA: only Alaska
    out = tmp_path / "out"
    out.mkdir()
    fill_store(out / STORE_NAME, predictions, table, Path("/card"))
    store = Store(out / STORE_NAME)
    store.set_meta("pass2", json.dumps({"country": "KEN", "stages": StageConfig(decision="adaptive").to_dict()}))
    store.close()

    def felid() -> str:
        document = json.loads((out / "predictions.json").read_text())
        coarse = next(p for p in document["predictions"] if p["filepath"].endswith("coarse.jpg"))
        return (coarse["detections"][2].get("reclassification") or {}).get("class", "")

    run_cli("reclassify", str(out), "--bundle", str(bundle))
    assert felid() != ts.LEOPARD  # blocked in the run's country, KEN
    run_cli("reclassify", str(out), "--bundle", str(bundle), "--country", "USA")
    assert felid() == ts.LEOPARD


def test_export_results_takes_and_remembers_the_deployment(tmp_path: Path) -> None:
    predictions, table, _ = scenario()
    out = tmp_path / "out"
    out.mkdir()
    fill_store(out / STORE_NAME, predictions, table, Path("/card"))
    missing = run_cli("export-results", str(out), "--format", "camtrap-dp", check=False)
    assert missing.returncode == 2 and "--timezone, --lat and --lon" in missing.stderr
    partial = run_cli("export-results", str(out), "--timezone", "+02:00", check=False)
    assert partial.returncode == 2 and "--lat, --lon" in partial.stderr and "Traceback" not in partial.stderr
    bad = run_cli("export-results", str(out), "--timezone", "Mars/Base", "--lat", "1", "--lon", "2", check=False)
    assert bad.returncode == 2 and "UTC offset" in bad.stderr
    run_cli("export-results", str(out), "--timezone", "+02:00", "--lat", "-22.5", "--lon", "17.1",
            "--deployment-id", "cam-7")
    deployments = (out / "camtrap-dp" / "deployments.csv").read_text()
    assert "cam-7" in deployments and "-22.5" in deployments
    (out / "camtrap-dp" / "deployments.csv").unlink()
    run_cli("export-results", str(out), "--format", "camtrap-dp")  # remembered in the store
    assert "cam-7" in (out / "camtrap-dp" / "deployments.csv").read_text()
