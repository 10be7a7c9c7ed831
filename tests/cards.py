"""Generated cards with a known answer for pass 2: easy references, hard coarse candidates, degraded views.

Species sit on a taxonomy tree (class > order > family > genus > species); each has a unit direction built
from its ancestors' directions plus its own. Easy crops are the direction plus small noise; hard crops
(and the degraded views pass 1 renders) are the direction shrunk by a difficulty factor plus large noise,
so they sit far from the centroids, as on a real card. The classifier's top-5 comes from a noisy softmax
over the known species that is sharp on easy crops and flat on hard ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trapedge.runtime.speciesnet.ensemble import Classification
from trapedge.runtime.reclassify import DegradedTable, EmbeddingTable, EvidenceTable, PassTwoInputs

DIM = 32
ANIMAL, BLANK = Classification.ANIMAL.value, Classification.BLANK.value


@dataclass
class Card:
    """A generated card: pass 2's inputs, the taxonomy and the truth per (filepath, detection)."""

    inputs: PassTwoInputs
    taxonomy_map: dict
    truth: dict
    species: list[str]
    unknown: list[str]


def _taxonomy(n_classes: int = 2, orders: int = 2, families: int = 2, genera: int = 2, species: int = 2):
    labels, parents = [], {}
    for c in range(n_classes):
        cname = "aves" if c == 0 else f"class{c}"
        labels.append(f"c{c};{cname};;;;;{cname}")
        for o in range(orders):
            labels.append(f"o{c}{o};{cname};ord{c}{o};;;;ord{c}{o}")
            for f in range(families):
                labels.append(f"f{c}{o}{f};{cname};ord{c}{o};fam{c}{o}{f};;;fam{c}{o}{f}")
                for g in range(genera):
                    labels.append(f"g{c}{o}{f}{g};{cname};ord{c}{o};fam{c}{o}{f};gen{c}{o}{f}{g};;gen")
                    for s in range(species):
                        labels.append(f"s{c}{o}{f}{g}{s};{cname};ord{c}{o};fam{c}{o}{f};gen{c}{o}{f}{g};"
                                      f"sp{s};species {c}{o}{f}{g}{s}")
    taxonomy_map = {";".join(lab.split(";")[1:6]): lab for lab in labels}
    taxonomy_map[";;;;"] = ANIMAL
    return labels, taxonomy_map


def _directions(labels: list[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Species direction: sum of its ancestors' random directions (shared structure) plus its own."""
    node_dir: dict[str, np.ndarray] = {}
    out = {}
    for lab in labels:
        ranks = lab.split(";")[1:6]
        if not ranks[4]:
            continue
        v = np.zeros(DIM)
        for depth, weight in zip(range(1, 6), (1.0, 0.8, 0.7, 0.6, 0.6)):
            key = ";".join(ranks[:depth])
            if key not in node_dir:
                node_dir[key] = rng.normal(size=DIM) / np.sqrt(DIM)
            v += weight * node_dir[key]
        out[lab] = v / np.linalg.norm(v)
    return out


def make_card(seed: int = 0, informative: bool = True, refs_per_species: int = 12, hard_per_species: int = 10,
              unknown_share: float = 0.2, views: int = 3, hard_noise: float = 0.55) -> Card:
    """A card with easy references, hard coarse candidates in bursts, unknown species and false detections."""
    rng = np.random.default_rng(seed)
    labels, taxonomy_map = _taxonomy()
    species = [lab for lab in labels if lab.split(";")[5]]
    dirs = _directions(species, rng)
    order = rng.permutation(len(species))
    n_unknown = max(1, int(round(unknown_share * len(species))))
    unknown = [species[i] for i in order[:n_unknown]]
    known = [s for s in species if s not in unknown]
    known_index = {s: i for i, s in enumerate(known)}

    def embed(label: str, difficulty: float) -> np.ndarray:
        if not informative:
            return rng.normal(size=DIM)
        base = dirs[label] if label in dirs else np.zeros(DIM)
        return (1.0 - 0.5 * difficulty) * base + (0.08 + hard_noise * difficulty) * rng.normal(size=DIM) / np.sqrt(
            DIM) * 4

    def top5(label: str, difficulty: float) -> tuple[list[str], list[float]]:
        logits = rng.normal(size=len(known)) * (0.5 + 1.5 * difficulty)
        if label in known_index and informative:
            logits[known_index[label]] += 6.0 * (1.0 - difficulty) + 0.5
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:5]
        return [known[i] for i in top], [float(p[i]) for i in top]

    predictions, emb_fp, emb_det, emb_vec = [], [], [], []
    ev_fp, ev_det, ev_top, ev_scores, ev_quality = [], [], [], [], []
    truth, events = {}, {}
    degraded = {"filepaths": [], "detections": [], "labels": [], "kinds": [], "vectors": [], "top_classes": [],
                "top_scores": [], "quality": []}
    image = 0

    def add(label_truth: str, processed: dict, vec: np.ndarray, top: tuple, side: float, event: str) -> tuple:
        nonlocal image
        fp = f"/card/cam{image % 3}/img{image:05d}.jpg"
        image += 1
        det = {"category": "1", "label": "animal", "conf": 0.8, "bbox": [0.1, 0.1, 0.2, 0.2],
               "processed_classification": processed,
               "raw_classifications": {"classes": top[0][:2], "scores": top[1][:2]}}
        predictions.append({"filepath": fp, "detections": [det]})
        emb_fp.append(fp)
        emb_det.append(0)
        emb_vec.append(vec)
        ev_fp.append(fp)
        ev_det.append(0)
        ev_top.append(top[0])
        ev_scores.append(top[1])
        ev_quality.append([side, 0.4, 0.05])
        truth[(fp, 0)] = label_truth
        events[fp] = event
        return fp, 0

    burst = 0
    for label in species:
        is_known = label in known_index
        n_refs = refs_per_species if is_known else 0
        hard_left = hard_per_species
        refs_left = n_refs
        while hard_left > 0 or refs_left > 0:
            event = f"burst{burst:05d}"
            burst += 1
            size = int(rng.integers(2, 6))
            for _ in range(size):
                if refs_left > 0 and (hard_left == 0 or rng.random() < 0.5):
                    refs_left -= 1
                    top = top5(label, 0.0)
                    fp, d = add(label, {"class": label, "score": 0.95, "source": "classifier"},
                                embed(label, 0.0), top, 300.0, event)
                    if refs_left < 8:
                        for v in range(views):
                            difficulty = rng.uniform(0.5, 1.0)
                            t = top5(label, difficulty)
                            degraded["filepaths"].append(fp)
                            degraded["detections"].append(d)
                            degraded["labels"].append(label)
                            degraded["kinds"].append("small")
                            degraded["vectors"].append(embed(label, difficulty))
                            degraded["top_classes"].append(t[0])
                            degraded["top_scores"].append(t[1])
                            degraded["quality"].append([30.0, 0.4, 0.05])
                        t = top5("", 1.0)
                        degraded["filepaths"].append(fp)
                        degraded["detections"].append(d)
                        degraded["labels"].append(BLANK)
                        degraded["kinds"].append("background")
                        degraded["vectors"].append(rng.normal(size=DIM))
                        degraded["top_classes"].append(t[0])
                        degraded["top_scores"].append(t[1])
                        degraded["quality"].append([30.0, 0.4, 0.05])
                elif hard_left > 0:
                    hard_left -= 1
                    difficulty = rng.uniform(0.5, 1.0)
                    add(label, {"class": ANIMAL, "score": 0.6, "source": "classifier+rollup_to_kingdom"},
                        embed(label, difficulty), top5(label, difficulty), 30.0, event)
                else:
                    break
    for _ in range(20):
        event = f"burst{burst:05d}"
        burst += 1
        add(BLANK, {"class": BLANK, "score": 0.7, "source": "classifier"}, rng.normal(size=DIM), top5("", 1.0),
            40.0, event)
    inputs = PassTwoInputs(
        predictions,
        EmbeddingTable(emb_fp, np.array(emb_det), np.array(emb_vec, dtype=np.float32)),
        EvidenceTable(ev_fp, np.array(ev_det), ev_top, ev_scores, np.array(ev_quality, dtype=np.float32)),
        DegradedTable(degraded["filepaths"], np.array(degraded["detections"]), degraded["labels"], degraded["kinds"],
                      np.array(degraded["vectors"], dtype=np.float32), degraded["top_classes"],
                      degraded["top_scores"], np.array(degraded["quality"], dtype=np.float32)),
        events)
    return Card(inputs, taxonomy_map, truth, species, unknown)


def hierarchically_right(label: str, truth: str) -> bool:
    """The label is the truth or one of its ancestors (a blank truth makes every animal label wrong)."""
    if truth == BLANK:
        return False
    ranks, true_ranks = label.split(";")[1:6], truth.split(";")[1:6]
    depth = sum(1 for r in ranks if r)
    return ranks[:depth] == true_ranks[:depth]
