"""Stage 3 + 4 offline: triplet head training, its ONNX export, head-space centroids in a bundle, reference CSVs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fixtures_models import check_edge_onnx, data_bundle  # noqa: E402
from trapedge.export.fit import (  # noqa: E402
    CENTROIDS_FILE,
    HEAD_FILE,
    HeadConfig,
    PKSampler,
    ReferenceSet,
    export_head,
    fit,
    project,
    references_from_csv,
    train_head,
    triplet_loss,
)
from trapedge.export.parity import ort_session  # noqa: E402
from trapedge.runtime.models.bundle import MANIFEST, Bundle, sha256_file  # noqa: E402
from trapedge.runtime.speciesnet.ensemble.taxonomy import get_ancestor_at_level, get_full_class_string  # noqa: E402
from trapedge.runtime.reclassify.stages import Centroids, StageConfig  # noqa: E402

DIM = 64
NUISANCE = 16  # leading dimensions carrying large label-free variance


def _label(uid: str, family: str = "", genus: str = "", species: str = "", common: str = "") -> str:
    return f"{uid};mammalia;carnivora;{family};{genus};{species};{common}"


def _taxonomy() -> tuple[list[str], list[str]]:
    """(12 species labels in 6 genera in 3 families, every taxonomy line incl. ancestors)."""
    species, lines = [], ["00-class;mammalia;;;;;mammal", _label("00-order", common="carnivores")]
    for f in range(3):
        lines.append(_label(f"f{f}", f"fam{f}", common=f"family {f}"))
        for g in range(2):
            lines.append(_label(f"g{f}{g}", f"fam{f}", f"gen{f}{g}", common=f"genus {f}{g}"))
            for s in range(2):
                species.append(_label(f"s{f}{g}{s}", f"fam{f}", f"gen{f}{g}", f"sp{s}", f"species {f}{g}{s}"))
    return species, lines + species


SPECIES, TAXONOMY_LINES = _taxonomy()
TAXONOMY_MAP = {get_full_class_string(line): line for line in TAXONOMY_LINES}


def _hierarchical(per_species: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Species mean = family mean + genus offset + species offset (0 on nuisance dims) + noise + nuisance variance."""
    rng = np.random.default_rng(seed)
    signal = np.ones(DIM)
    signal[:NUISANCE] = 0.0
    families = rng.normal(0.0, 1.0, (3, DIM))
    rows, labels = [], []
    for i, label in enumerate(SPECIES):
        if i % 2 == 0:
            genus = rng.normal(0.0, 0.6, DIM)
        mean = (families[i // 4] + genus + rng.normal(0.0, 0.35, DIM)) * signal
        x = mean + rng.normal(0.0, 0.5, (per_species, DIM))
        x[:, :NUISANCE] += rng.normal(0.0, 3.0, (per_species, NUISANCE))
        rows.append(x)
        labels += [label] * per_species
    return np.concatenate(rows).astype(np.float32), labels


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _nearest_centroid_accuracy(train: np.ndarray, train_labels: list[str], test: np.ndarray,
                               test_labels: list[str]) -> float:
    names = sorted(set(train_labels))
    tl = np.array(train_labels)
    centroids = _unit(np.stack([_unit(train)[tl == n].mean(axis=0) for n in names]))
    predicted = np.array(names)[np.argmax(_unit(test) @ centroids.T, axis=1)]
    return float(np.mean(predicted == np.array(test_labels)))


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    x, labels = _hierarchical(per_species=40)
    train = np.arange(len(labels)) % 2 == 0
    lab = np.array(labels)
    return x[train], list(lab[train]), x[~train], list(lab[~train])


@pytest.fixture(scope="module")
def trained(split) -> tuple[torch.nn.Module, dict]:
    x, labels, _, _ = split
    return train_head(x, labels, HeadConfig(epochs=30))


@pytest.fixture()
def tiny_bundle(tmp_path: Path) -> Path:
    """A bundle with labels, taxonomy and geofence only, as fit finds it before a head exists."""
    return data_bundle(tmp_path / "bundle", SPECIES, TAXONOMY_LINES)


def test_training_lowers_loss_and_beats_raw_space(split, trained) -> None:
    x, labels, x_test, test_labels = split
    module, stats = trained
    ev = stats["eval"]
    assert stats["train_loss"][-1] < 0.25 * stats["train_loss"][0]
    assert ev["loss_after"] < 0.25 * ev["loss_before"]
    assert ev["loss_after"] < 0.25 * ev["loss_raw"]
    assert ev["recall_at_1_after"] > ev["recall_at_1_raw"]
    raw = _nearest_centroid_accuracy(x, labels, x_test, test_labels)
    head = _nearest_centroid_accuracy(project(module, x), labels, project(module, x_test), test_labels)
    assert head >= 0.85
    assert head >= raw + 0.15, (raw, head)
    assert not module.training


def test_same_seed_same_weights() -> None:
    x, labels = _hierarchical(per_species=8, seed=3)
    state = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(), torch.get_rng_state())
    config = HeadConfig(epochs=4, hidden=64, out_dim=32)
    first, stats_a = train_head(x, labels, config)
    second, stats_b = train_head(x, labels, config)
    other, _ = train_head(x, labels, HeadConfig(epochs=4, hidden=64, out_dim=32, seed=1))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert np.array_equal(project(first, x), project(second, x))
    assert stats_a["train_loss"] == stats_b["train_loss"]
    assert not np.array_equal(project(first, x), project(other, x))
    assert torch.are_deterministic_algorithms_enabled() == state[0]
    assert torch.get_num_threads() == state[1]
    assert torch.equal(torch.get_rng_state(), state[2])


def test_head_onnx_parity(trained, tmp_path: Path) -> None:
    module, _ = trained
    path = tmp_path / HEAD_FILE
    entry = export_head(module, DIM, path, log=lambda _: None)
    check_edge_onnx(path, inputs=["embedding"], outputs=["projected"])
    assert entry["sha256"] == sha256_file(path)
    assert entry["inputs"][0]["shape"] == ["batch", DIM] and entry["outputs"][0]["shape"] == ["batch", 256]
    assert entry["parity"]["projected"]["max_abs_diff"] < 1e-5
    session = ort_session(path)
    rng = np.random.default_rng(1)
    for n in (1, 7, 300):
        batch = (rng.normal(0.0, 1.0, (n, DIM)) * rng.uniform(0.1, 10.0, (n, 1))).astype(np.float32)
        out = session.run(["projected"], {"embedding": batch})[0]
        assert out.shape == (n, 256)
        assert np.abs(out - project(module, batch)).max() < 1e-5
        assert np.abs(np.linalg.norm(out.astype(np.float64), axis=1) - 1.0).max() < 1e-5


def test_fit_writes_head_centroids_and_manifest(tiny_bundle: Path) -> None:
    x, labels = _hierarchical(per_species=10, seed=1)
    stages = StageConfig(n_min=5)
    manifest = fit(tiny_bundle, ReferenceSet(x, labels), head=HeadConfig(epochs=8), stages=stages,
                   log=lambda _: None)
    assert manifest == json.loads((tiny_bundle / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["stages"] == stages.to_dict()
    head = manifest["models"]["head"]
    assert head["file"] == HEAD_FILE and head["sha256"] == sha256_file(tiny_bundle / HEAD_FILE)
    assert head["training"]["eval"]["loss_after"] < head["training"]["eval"]["loss_before"]
    entry = manifest["files"]["centroids"]
    assert entry["file"] == CENTROIDS_FILE and entry["sha256"] == sha256_file(tiny_bundle / CENTROIDS_FILE)
    assert entry["space"] == "head" and entry["dim"] == 256 and entry["references"] == len(labels)
    Bundle.load(tiny_bundle)
    assert not list(tiny_bundle.glob(".fit-*")) and not list(tiny_bundle.glob(f".{MANIFEST}*"))

    with np.load(tiny_bundle / CENTROIDS_FILE, allow_pickle=False) as data:
        assert {"labels", "levels", "vectors", "counts", "mean_distance", "std_distance"} <= set(data.files)
    cents = Centroids.load(tiny_bundle / CENTROIDS_FILE)
    level_of = dict(zip(cents.labels, cents.levels, strict=True))
    genera = {get_ancestor_at_level(s, "genus", TAXONOMY_MAP) for s in SPECIES}
    families = {get_ancestor_at_level(s, "family", TAXONOMY_MAP) for s in SPECIES}
    assert len(genera) == 6 and len(families) == 3
    assert all(level_of[g] == "genus" for g in genera) and all(level_of[f] == "family" for f in families)
    assert all(level_of[s] == "species" for s in SPECIES)
    assert level_of[TAXONOMY_MAP["mammalia;carnivora;;;"]] == "order"
    assert len(cents) == 12 + 6 + 3 + 1 + 1
    assert cents.vectors.shape == (len(cents), 256)
    assert np.allclose(np.linalg.norm(cents.vectors, axis=1), 1.0, atol=1e-5)

    session = ort_session(tiny_bundle / HEAD_FILE)
    projected = session.run(["projected"], {"embedding": x})[0]
    for genus in genera:
        members = [i for i, lab in enumerate(labels) if get_ancestor_at_level(lab, "genus", TAXONOMY_MAP) == genus]
        k = cents.index[genus]
        assert cents.counts[k] == len(members) == 20
        assert np.abs(cents.vectors[k] - _unit(projected[members].astype(np.float64).mean(axis=0))).max() < 1e-5


def test_fit_refuses_references_of_another_embedding(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / MANIFEST).read_text(encoding="utf-8"))
    manifest["embedding"] = {"backbone": "open_clip", "model": "encoder", "output": "embedding", "dim": 32}
    (tiny_bundle / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    x, labels = _hierarchical(per_species=4)
    with pytest.raises(ValueError, match="64-d but the bundle's embedding"):
        fit(tiny_bundle, ReferenceSet(x, labels), head=HeadConfig(epochs=1), log=lambda _: None)
    assert not (tiny_bundle / HEAD_FILE).exists()


def test_single_reference_label_is_negative_only() -> None:
    x, labels = _hierarchical(per_species=10, seed=2)
    lonely = _label("s999", "fam0", "gen00", "sp9", "lonely")
    x = np.concatenate([x, x[:1] + 0.1])
    labels = labels + [lonely]
    config = HeadConfig(epochs=10, p=4, k=3, extra_negatives=2)
    sampler = PKSampler(labels, config)
    single = len(labels) - 1
    seen = 0
    for _ in range(50):
        rows, anchors = sampler.batch()
        assert len(rows) == 4 * 3 + 1
        assert not anchors[rows == single].any()
        seen += int((rows == single).sum())
        for block in rows[anchors].reshape(4, 3):
            assert len({labels[i] for i in block}) == 1 and len(set(block.tolist())) >= 2
    assert seen == 50
    module, stats = train_head(x, labels, config)
    assert stats["negative_only_labels"] == 1 and stats["anchor_labels"] == 12
    assert stats["eval"]["loss_after"] < stats["eval"]["loss_before"]
    assert np.all(np.isfinite(project(module, x)))


def test_unusable_reference_sets_are_refused() -> None:
    x, _ = _hierarchical(per_species=2)
    with pytest.raises(ValueError, match="two or more references"):
        train_head(x[:3], SPECIES[:3], HeadConfig(epochs=1))
    with pytest.raises(ValueError, match="two labels"):
        train_head(x[:4], [SPECIES[0]] * 4, HeadConfig(epochs=1))
    with pytest.raises(ValueError, match="7 parts"):
        train_head(x[:4], ["cat"] * 4, HeadConfig(epochs=1))
    with pytest.raises(ValueError, match="mining"):
        HeadConfig(mining="hardest")


def _reference_loss(e: np.ndarray, label_ids: np.ndarray, sample_ids: np.ndarray, anchors: np.ndarray,
                    margin: float, mining: str) -> float:
    """Loop-by-loop triplet loss on cosine distance, from the definitions."""
    d = np.clip(1.0 - e @ e.T, 0.0, 2.0)
    losses = []
    for a in np.flatnonzero(anchors):
        pos = [p for p in range(len(e)) if label_ids[p] == label_ids[a] and sample_ids[p] != sample_ids[a]]
        neg = [n for n in range(len(e)) if label_ids[n] != label_ids[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            losses.append(max(0.0, max(d[a, pos]) - min(d[a, neg]) + margin))
            continue
        for p in pos:
            semi = [d[a, n] for n in neg if d[a, p] < d[a, n] < d[a, p] + margin]
            dn = min(semi) if semi else min(d[a, neg])
            losses.append(max(0.0, d[a, p] - dn + margin))
    return float(np.mean(losses))


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
def test_mining_modes(mining: str) -> None:
    rng = np.random.default_rng(4)
    e = _unit(rng.normal(size=(22, 6))).astype(np.float64)
    label_ids = np.repeat(np.arange(5), [5, 5, 4, 4, 4])
    sample_ids = np.arange(22)
    sample_ids[4] = sample_ids[3]
    anchors = np.ones(22, dtype=bool)
    anchors[-3:] = False
    loss, _ = triplet_loss(torch.from_numpy(e), torch.from_numpy(label_ids), torch.from_numpy(sample_ids),
                           torch.from_numpy(anchors), 0.2, mining)
    assert float(loss) == pytest.approx(_reference_loss(e, label_ids, sample_ids, anchors, 0.2, mining), abs=1e-12)

    x, labels = _hierarchical(per_species=10, seed=5)
    _, stats = train_head(x, labels, HeadConfig(epochs=10, mining=mining))
    assert stats["train_loss"][-1] < stats["train_loss"][0]
    assert stats["eval"]["loss_after"] < stats["eval"]["loss_before"]


def test_references_from_csv(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.zeros((80, 100, 3), dtype=np.uint8)
    pixels[:, 50:] = (200, 10, 10)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(pixels).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(255 - pixels).save(tmp_path / "b.png")
    rows = [
        "filepath,label,xmin,ymin,width,height",
        f"imgs/a.png,{SPECIES[0]},0.5,0.0,0.5,0.5",
        f"imgs/a.png,{SPECIES[1]},,,,",
        f"{tmp_path / 'b.png'},{SPECIES[2]},0.0,0.25,0.5,0.5",
    ]
    (tmp_path / "refs.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    calls = []

    def embed(crops: list[np.ndarray]) -> np.ndarray:
        calls.append(len(crops))
        return np.array([[*c.reshape(-1, 3).mean(axis=0), *c.shape[:2]] for c in crops])

    refs = references_from_csv(tmp_path / "refs.csv", embed, batch_size=2)
    assert calls == [2, 1]
    assert refs.labels == SPECIES[:3]
    assert refs.embeddings.dtype == np.float32
    np.testing.assert_allclose(refs.embeddings[0], [200, 10, 10, 40, 50])
    np.testing.assert_allclose(refs.embeddings[1], [100, 5, 5, 80, 100])
    np.testing.assert_allclose(refs.embeddings[2], [255, 255, 255, 40, 50])

    (tmp_path / "bad.csv").write_text("filepath,label\nimgs/a.png,cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.csv:2"):
        references_from_csv(tmp_path / "bad.csv", embed)
    (tmp_path / "partial.csv").write_text(f"filepath,label,xmin\nimgs/a.png,{SPECIES[0]},0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="box needs"):
        references_from_csv(tmp_path / "partial.csv", embed)
