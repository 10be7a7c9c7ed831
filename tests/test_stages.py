"""Unit tests of the five stages on small hand-built taxonomies and embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from trapedge.runtime.speciesnet.ensemble import Classification
from trapedge.runtime.reclassify.stages import (
    StageConfig, accept, aves_mass, bird_probability, birds, build_centroids, is_descendant, label_depth, score,
)

BLANK, ANIMAL = Classification.BLANK.value, Classification.ANIMAL.value
MAMMAL = "m0;mammalia;;;;;mammal"
CARN = "o1;mammalia;carnivora;;;;carnivores"
FELID = "f1;mammalia;carnivora;felidae;;;cat family"
PANTHERA = "g1;mammalia;carnivora;felidae;panthera;;panthera"
LION = "s1;mammalia;carnivora;felidae;panthera;leo;lion"
LEOPARD = "s2;mammalia;carnivora;felidae;panthera;pardus;leopard"
CANID = "f2;mammalia;carnivora;canidae;;;dog family"
CANIS = "g2;mammalia;carnivora;canidae;canis;;canis"
JACKAL = "s3;mammalia;carnivora;canidae;canis;mesomelas;jackal"
BIRD = "c2;aves;;;;;bird"
OSTRICH = "s4;aves;struthioniformes;struthionidae;struthio;camelus;ostrich"
TAXONOMY = [MAMMAL, CARN, FELID, PANTHERA, LION, LEOPARD, CANID, CANIS, JACKAL, BIRD, OSTRICH,
            "o2;aves;struthioniformes;;;;ostriches", "f3;aves;struthioniformes;struthionidae;;;ostrich family",
            "g3;aves;struthioniformes;struthionidae;struthio;;struthio"]
TAXONOMY_MAP = {";".join(t.split(";")[1:6]): t for t in TAXONOMY} | {";;;;": ANIMAL}
DIM = 16


def _directions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = {name: rng.normal(size=DIM) for name in ("felid", "canid", "bird")}
    out = {LION: base["felid"] + 0.8 * rng.normal(size=DIM), LEOPARD: base["felid"] + 0.8 * rng.normal(size=DIM),
           JACKAL: base["canid"] + 0.8 * rng.normal(size=DIM), OSTRICH: base["bird"] + 0.8 * rng.normal(size=DIM)}
    return {k: v / np.linalg.norm(v) for k, v in out.items()}


def _refs(counts: dict[str, int], noise: float = 0.05, seed: int = 1) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    dirs = _directions()
    vecs, labels = [], []
    for label, n in counts.items():
        for _ in range(n):
            vecs.append(dirs[label] + noise * rng.normal(size=DIM))
            labels.append(label)
    return np.asarray(vecs), labels


def _near(label: str, noise: float = 0.02, seed: int = 9) -> np.ndarray:
    return _directions()[label] + noise * np.random.default_rng(seed).normal(size=DIM)


def test_label_depth_and_descendants() -> None:
    assert [label_depth(x) for x in (ANIMAL, MAMMAL, CARN, FELID, PANTHERA, LION, BLANK)] == [0, 1, 2, 3, 4, 5, -1]
    assert is_descendant(LION, PANTHERA) and is_descendant(LION, ANIMAL) and is_descendant(LION, BLANK)
    assert not is_descendant(PANTHERA, LION) and not is_descendant(LION, LION) and not is_descendant(JACKAL, FELID)


def test_accept_only_confident_species_from_the_classifier() -> None:
    labels = [LION, LION, PANTHERA, LION, LION]
    scores = np.array([0.9, 0.79, 0.95, 0.8, 0.99])
    sources = ["classifier", "classifier", "classifier", "classifier", "classifier+rollup_to_genus"]
    assert accept(labels, scores, sources, StageConfig()).tolist() == [True, False, False, True, False]


def test_birds_need_evidence_and_detector_confidence() -> None:
    labels = [BLANK, ANIMAL, MAMMAL, BLANK, BLANK]
    conf = np.array([0.5, 0.5, 0.5, 0.05, 0.5])
    aves = aves_mass([[OSTRICH, LION]] * 4 + [[LION]], [[0.6, 0.3]] * 4 + [[0.9]])
    assert aves.tolist() == [0.6, 0.6, 0.6, 0.6, 0.0]
    assert birds(labels, conf, aves, None, StageConfig()).tolist() == [True, True, False, False, False]
    prompts = np.eye(DIM)[:3]
    emb = np.zeros((5, DIM))
    emb[4, 0] = 1.0
    prob = bird_probability(emb, prompts, [0])
    assert prob[4] > 0.99 and abs(prob[0] - 1 / 3) < 1e-6
    assert birds(labels, conf, aves, prob, StageConfig()).tolist() == [True, True, False, False, True]


def test_centroids_pool_ancestors_and_respect_n_min() -> None:
    vecs, labels = _refs({LION: 2, LEOPARD: 2, JACKAL: 1})
    cents = build_centroids(vecs, labels, TAXONOMY_MAP, StageConfig(n_min=2))
    assert set(cents.labels) == {LION, LEOPARD, PANTHERA, FELID, CARN, MAMMAL}
    assert cents.counts[cents.index[FELID]] == 4 and cents.counts[cents.index[CARN]] == 5
    one = build_centroids(vecs, labels, TAXONOMY_MAP, StageConfig(n_min=1))
    assert JACKAL in one.index and one.std_distance[one.index[JACKAL]] == 0.0
    assert np.allclose(np.linalg.norm(one.vectors, axis=1), 1.0)


def test_no_references_means_no_reclassification() -> None:
    cents = build_centroids(np.zeros((0, DIM)), [], TAXONOMY_MAP, StageConfig())
    assert len(cents) == 0
    assert score(np.ones((2, DIM)), [ANIMAL, BLANK], np.ones(2), cents, lambda _: True, StageConfig()) == [None, None]


def test_coarse_detections_roll_down_never_up_and_stay_inside_their_label() -> None:
    vecs, labels = _refs({LION: 5, LEOPARD: 5, JACKAL: 5, OSTRICH: 5})
    config = StageConfig()
    cents = build_centroids(vecs, labels, TAXONOMY_MAP, config)
    x = np.stack([_near(LION), _near(LION), _near(JACKAL), _near(LION)])
    out = score(x, [ANIMAL, FELID, MAMMAL, CANID], np.ones(4), cents, lambda _: True, config)
    assert out[0].label == LION and out[0].level == "species" and out[0].original == ANIMAL
    assert out[1].label == LION
    assert out[2].label == JACKAL
    # a lion-looking crop SpeciesNet called "dog family" can only become a canid, or stay
    assert out[3] is None or is_descendant(out[3].label, CANID)
    for d, original in zip(out, [ANIMAL, FELID, MAMMAL, CANID]):
        if d is not None:
            assert label_depth(d.label) > label_depth(original)
            assert d.distance <= d.threshold


def test_unknown_species_stays_coarse() -> None:
    vecs, labels = _refs({LION: 5, JACKAL: 5})
    cents = build_centroids(vecs, labels, TAXONOMY_MAP, StageConfig())
    stranger = np.random.default_rng(42).normal(size=DIM)
    assert score(stranger[None], [ANIMAL], np.ones(1), cents, lambda _: True, StageConfig()) == [None]


def test_geofence_blocked_species_is_never_chosen() -> None:
    vecs, labels = _refs({LION: 5, LEOPARD: 5})
    cents = build_centroids(vecs, labels, TAXONOMY_MAP, StageConfig())
    blocked = {LION}
    out = score(_near(LION)[None], [ANIMAL], np.ones(1), cents, lambda lab: lab not in blocked, StageConfig())
    assert out[0] is None or out[0].label not in blocked


def test_blank_below_detector_floor_stays_blank() -> None:
    vecs, labels = _refs({LION: 5})
    cents = build_centroids(vecs, labels, TAXONOMY_MAP, StageConfig())
    x = np.stack([_near(LION), _near(LION)])
    out = score(x, [BLANK, BLANK], np.array([0.19, 0.2]), cents, lambda _: True, StageConfig())
    assert out[0] is None and out[1] is not None and out[1].label == LION


def test_ties_fall_back_to_the_shared_ancestor() -> None:
    vecs, labels = _refs({LION: 5, LEOPARD: 5})
    cents = build_centroids(vecs, labels, TAXONOMY_MAP, StageConfig())
    midpoint = cents.vectors[cents.index[LION]] + cents.vectors[cents.index[LEOPARD]]
    out = score(midpoint[None], [ANIMAL], np.ones(1), cents, lambda _: True, StageConfig(lam=50, t_max=2.0))
    assert out[0] is not None and out[0].level != "species"
    assert out[0].label in (PANTHERA, FELID, CARN)
    assert out[0].margin is None or out[0].margin >= 0


def test_mahalanobis_scoring_reclassifies_too() -> None:
    vecs, labels = _refs({LION: 40, LEOPARD: 40, JACKAL: 40})
    config = StageConfig(scoring="mahalanobis")
    cents = build_centroids(vecs, labels, TAXONOMY_MAP, config)
    assert cents.whitening.shape == (DIM, DIM) and cents.inv_var.shape == (len(cents), DIM)
    out = score(np.stack([_near(LEOPARD), _near(JACKAL)]), [ANIMAL, ANIMAL], np.ones(2), cents,
                lambda _: True, config)
    assert [d.label if d else None for d in out] == [LEOPARD, JACKAL]


def test_config_refuses_unknown_settings() -> None:
    with pytest.raises(ValueError, match="unknown stage settings: tau"):
        StageConfig.from_dict({"tau": 0.5})
    with pytest.raises(ValueError, match="scoring"):
        StageConfig(scoring="euclid")
    assert StageConfig.from_dict(StageConfig(lam=3).to_dict()) == StageConfig(lam=3)


def test_mahalanobis_matrix_equals_the_explicit_distance_and_memory_is_bounded() -> None:
    from trapedge.runtime.reclassify.stages import distance_matrix

    vecs, labels = _refs({LION: 30, LEOPARD: 30, JACKAL: 30})
    config = StageConfig(scoring="mahalanobis")
    cents = build_centroids(vecs, labels, TAXONOMY_MAP, config)
    x = np.stack([_near(LEOPARD), _near(JACKAL), _near(OSTRICH)])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    got = distance_matrix(x, cents, np.arange(len(cents)), config)
    for i in range(len(x)):
        for k in range(len(cents)):
            z = cents.whitening @ (x[i] - cents.vectors[k])
            assert got[i, k] == pytest.approx((z ** 2 * cents.inv_var[k]).sum() / DIM, rel=1e-6, abs=1e-9)
    held = cents.whitening.nbytes + cents.inv_var.nbytes
    assert held == (DIM * DIM + len(cents) * DIM) * 8  # one whitening, a diagonal per centroid
