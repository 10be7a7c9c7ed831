"""Differential test: 10,000+ random ensemble inputs give identical outputs from the port and SpeciesNet."""

from __future__ import annotations

import random
import uuid

import pytest

from trapedge.runtime.speciesnet import ensemble as port
from trapedge.runtime.speciesnet.ensemble import geofence as port_geofence

sn_combiner = pytest.importorskip("speciesnet.ensemble_prediction_combiner")
sn_geofence = pytest.importorskip("speciesnet.geofence_utils")
sn_ensemble = pytest.importorskip("speciesnet.ensemble")

CASES = 12_000
# Values on both sides of every SpeciesNet threshold, plus the thresholds themselves.
EDGES = [0.0, 0.05, 0.1, 0.19999, 0.2, 0.20001, 0.3, 0.4, 0.40001, 0.5, 0.50001, 0.6, 0.65, 0.65001,
         0.7, 0.70001, 0.75, 0.8, 0.80001, 0.9, 0.99, 0.99001, 1.0]
COUNTRIES = [None, "USA", "KEN", "NAM", "GBR", "FRA"]
REGIONS = {"USA": [None, "CA", "NY", "TX"], "GBR": [None, "EN", "SC"]}


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


def fabricate_taxonomy(rng: random.Random) -> tuple[list[str], list[str], dict]:
    """A random tree class > order > family > genus > species; returns (classifier labels, taxonomy, geofence)."""
    taxonomy = []
    for cls in ("mammalia", "aves", "reptilia"):
        taxonomy.append(f"{_uid(rng)};{cls};;;;;{cls} class")
        for o in range(rng.randint(1, 3)):
            order = f"{cls[:3]}order{o}"
            taxonomy.append(f"{_uid(rng)};{cls};{order};;;;{order}")
            for f in range(rng.randint(1, 3)):
                family = f"{order}fam{f}"
                taxonomy.append(f"{_uid(rng)};{cls};{order};{family};;;{family}")
                for g in range(rng.randint(1, 2)):
                    genus = f"{family}gen{g}"
                    taxonomy.append(f"{_uid(rng)};{cls};{order};{family};{genus};;{genus}")
                    for s in range(rng.randint(1, 3)):
                        taxonomy.append(f"{_uid(rng)};{cls};{order};{family};{genus};sp{s};{genus} sp{s}")
    specials = [c.value for c in (port.Classification.BLANK, port.Classification.ANIMAL,
                                  port.Classification.HUMAN, port.Classification.VEHICLE)]
    labels = specials + [t for t in taxonomy if rng.random() < 0.8]
    # A few labels the taxonomy does not know (rolled up to nothing, never geofenced).
    labels += [f"{_uid(rng)};amphibia;anura;ranidae;rana;sp{i};frog {i}" for i in range(2)]
    geofence = {}
    for label in rng.sample(taxonomy, k=len(taxonomy) // 2):
        key = ";".join(label.split(";")[1:6])
        rule = {}
        if rng.random() < 0.6:
            rule["allow"] = {c: rng.choice([[], ["CA"], ["NY", "TX"], ["EN"]])
                             for c in rng.sample(["USA", "KEN", "NAM", "GBR"], k=rng.randint(1, 3))}
        if rng.random() < 0.5:
            rule["block"] = {c: rng.choice([[], ["CA"], ["SC"]])
                             for c in rng.sample(["USA", "KEN", "GBR", "FRA"], k=rng.randint(1, 2))}
        geofence[key] = rule
    return labels, taxonomy, geofence


def _scores(rng: random.Random, n: int) -> list[float]:
    if rng.random() < 0.5:
        top = rng.choice(EDGES)
        rest = sorted((rng.uniform(0, 1 - top) / n for _ in range(n - 1)), reverse=True)
        rest = [min(r, top) for r in rest]
        return [top] + rest
    raw = [rng.random() ** rng.choice([1, 3, 8]) for _ in range(n)]
    total = sum(raw)
    return sorted((r / total for r in raw), reverse=True)


def _case(rng: random.Random, labels: list[str]) -> dict:
    n = rng.randint(1, 5) if rng.random() < 0.1 else 5
    classes = rng.sample(labels, k=n)
    if rng.random() < 0.3:
        classes[0] = rng.choice(labels[:4])
    detections = {"label": rng.choice(["animal", "human", "vehicle"]), "conf": rng.choice(EDGES + [rng.random()])}
    country = rng.choice(COUNTRIES)
    region = rng.choice(REGIONS.get(country, [None])) if country else None
    return {"classes": classes, "scores": _scores(rng, n), "det": detections, "country": country,
            "admin1": region, "geofence": rng.random() < 0.85}


def _run(module_combiner, module_geofence, case: dict, taxonomy_map: dict, geofence_map: dict, many: int):
    return module_combiner.combine_predictions(
        classifications_list=[{"classes": case["classes"], "scores": case["scores"]}] * many,
        detections=[case["det"]] * many,
        country=case["country"], admin1_region=case["admin1"],
        taxonomy_map=taxonomy_map, geofence_map=geofence_map, enable_geofence=case["geofence"],
        geofence_fn=module_geofence.geofence_animal_classification,
        roll_up_fn=module_geofence.roll_up_labels_to_first_matching_level,
    )


def test_taxonomy_loading_matches(tmp_path) -> None:
    rng = random.Random(1)
    _, taxonomy, _ = fabricate_taxonomy(rng)
    path = tmp_path / "taxonomy.txt"
    path.write_text("\n".join(taxonomy + [port.Classification.BLANK.value]) + "\n", encoding="utf-8")
    assert port.load_taxonomy(path) == sn_ensemble._load_taxonomy_from_file(path)


def test_random_ensemble_inputs_identical(tmp_path) -> None:
    rng = random.Random(20261128)
    sources = set()
    checked = 0
    for world in range(20):
        labels, taxonomy, geofence = fabricate_taxonomy(rng)
        path = tmp_path / f"taxonomy{world}.txt"
        path.write_text("\n".join(taxonomy) + "\n", encoding="utf-8")
        taxonomy_map = port.load_taxonomy(path)
        for _ in range(CASES // 20):
            case = _case(rng, labels)
            many = 0 if rng.random() < 0.01 else 1
            ours = _run(port, port_geofence, case, taxonomy_map, geofence, many)
            theirs = _run(sn_combiner, sn_geofence, case, taxonomy_map, geofence, many)
            assert ours == theirs, case
            sources.update(r["source"] for r in ours)
            checked += 1
    assert checked >= 10_000
    # The inputs reached every kind of decision SpeciesNet can make.
    expected = {"detector", "classifier", "classifier+rollup_to_genus", "classifier+rollup_to_family",
                "classifier+rollup_to_order", "classifier+rollup_to_class", "classifier+rollup_to_kingdom",
                "classifier+geofence+rollup_to_family", "classifier+geofence+rollup_to_order",
                "classifier+geofence+rollup_to_class"}
    assert expected <= sources, expected - sources


def test_failed_inputs_fail_alike() -> None:
    case = {"classes": [port.Classification.ANIMAL.value], "scores": [0.9], "det": {"label": "animal", "conf": 0.9},
            "country": "USA", "admin1": None, "geofence": True}
    for bad in ({"country": "US"}, {"admin1": "CAL"}):
        bad_case = {**case, **bad}
        geofence = {";;;;": {"allow": {"KEN": []}}}
        with pytest.raises(ValueError):
            _run(sn_combiner, sn_geofence, bad_case, {";;;;": case["classes"][0]}, geofence, 1)
        with pytest.raises(ValueError):
            _run(port, port, bad_case, {";;;;": case["classes"][0]}, geofence, 1)
    mismatch = dict(classifications_list=[], detections=[{"label": "animal", "conf": 0.5}], country=None,
                    admin1_region=None, taxonomy_map={}, geofence_map={}, enable_geofence=True,
                    geofence_fn=None, roll_up_fn=None)
    with pytest.raises(ValueError):
        sn_combiner.combine_predictions(**mismatch)
    with pytest.raises(ValueError):
        port.combine_predictions(**mismatch)
