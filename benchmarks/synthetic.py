"""Pass 2 (stages 1, 2, 3 and 5) on a seeded synthetic dump, against two baselines and the paper's numbers.

The dump has a class > order > family > genus > species tree as SpeciesNet 7-field labels, hierarchical
embeddings (species mean plus crop-quality noise and per-scene background), SpeciesNet top-5 scores run
through trapedge's port of SpeciesNet's ensemble (so the roll-ups are SpeciesNet's own), hidden birds, empty
crops and species outside SpeciesNet's vocabulary. Writes results/synthetic.json and results/synthetic.md.

    python benchmarks/synthetic.py [--preset paper hard easy] [--detections N] [--seed S] [--seeds K] [--sweep]
                                   [--timing 15000 150000] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402
from trapedge.runtime.ensemble import Classification, Ensemble  # noqa: E402
from trapedge.runtime.ensemble.taxonomy import get_full_class_string, split_label  # noqa: E402
from trapedge.runtime.stages import (  # noqa: E402
    Centroids,
    Decision,
    StageConfig,
    accept,
    aves_mass,
    bird_probability,
    birds,
    build_centroids,
    is_descendant,
    label_depth,
    score,
)

__all__ = [
    "PRESETS",
    "Dump",
    "Pass2",
    "Preset",
    "evaluate",
    "generate",
    "is_correct",
    "nearest_centroid",
    "run_pass2",
    "smoothing",
]

BLANK = Classification.BLANK.value
ANIMAL = Classification.ANIMAL.value
CLASS_LABELS = {
    "mammalia": "f2d233e3-80e3-433d-9687-e29ecc7a467a;mammalia;;;;;mammal",
    "aves": "b1352069-a39c-4a84-a949-60044271c0c1;aves;;;;;bird",
}
PROMPTS = ("mammalia", "aves", "reptilia", "empty")
TARGETS = {"accuracy": 0.965, "species_share": 0.65, "bird_accuracy": 0.968, "unknown_forced": 0.02,
           "pass2_seconds": 1.0}
_SYLLABLES = ("ba", "ca", "da", "fe", "ga", "hi", "la", "ma", "na", "pe", "ra", "sa", "ta", "vi", "xo", "zu",
              "lo", "mi", "cu", "ne", "po", "ri", "tu", "ve", "ko", "ly", "th", "or")
_SUFFIX = {"order": "formes", "family": "idae", "genus": "us", "species": "is"}


@dataclass(frozen=True)
class Preset:
    """Every knob of the generator.

    Attributes:
        detections, dim: dump size and embedding (head output) dimension.
        orders, families, genera, species: the tree: (class, orders, share of detections) and children ranges.
        present, unknown, zipf: share of tree species in the dump, share of those outside SpeciesNet's
            vocabulary (drawn from the rarer two thirds), Zipf exponent of abundance.
        offsets: norms of the class, order, family, genus and species offsets summed into a species mean.
        noise, noise_quality, noise_jitter: per-crop noise norm, its growth as crop quality falls, log-normal spread.
        background, nuisance_rank, nuisance: scene background shared by a burst's crops and its low-rank variation.
        quality: Beta(a, b) of crop quality (visibility of the animal, detector confidence).
        competence, gain, mid, jitter: SpeciesNet's top-1 logit = gain * (quality - mid) + N(0, competence) per
            species + N(0, jitter) per crop.
        unknown_penalty: logit penalty for a species outside the vocabulary (its top-1 is a relative).
        swap: chance SpeciesNet's top-1 is a sibling species (wrong references).
        confusers: weights of the other top-5 labels: genus, family, order, class relatives, ancestors, other class.
        lookalike, lookalike_mix, lookalike_penalty: chance a crop's embedding is pulled towards a relative, by how
            much, and how much less sure SpeciesNet is about it.
        small_bird, small_other, small_bird_quality: share of small crops among birds and other animals, and
            their quality; bird_visitors: chance an image also holds 1-2 small birds.
        ambiguity, small_confusers: noise of small crops along the prompt directions; other-class confuser weight.
        blankish_bird, blankish, blank_share: chance a small bird / other crop draws a blank score, and its Beta.
        empty, empty_conf: empty crops per detection and their detector-confidence Beta.
        mix, detections_per_image, images_per_burst: dump layout (share of off-species detections per image).
        prompt_alignment: how closely the text prompts point along the class and background directions.
    """

    detections: int = 15_000
    dim: int = 256
    orders: tuple[tuple[str, int, float], ...] = (("mammalia", 6, 0.8), ("aves", 5, 0.12), ("reptilia", 2, 0.08))
    families: tuple[int, int] = (1, 3)
    genera: tuple[int, int] = (1, 3)
    species: tuple[int, int] = (1, 4)
    present: float = 0.6
    unknown: float = 0.06
    zipf: float = 1.0
    offsets: tuple[float, float, float, float, float] = (1.0, 0.8, 0.6, 0.45, 0.45)
    noise: float = 0.55
    noise_quality: float = 1.0
    noise_jitter: float = 0.15
    background: float = 0.35
    nuisance_rank: int = 16
    nuisance: float = 0.6
    quality: tuple[float, float] = (10.0, 1.0)
    competence: float = 2.0
    gain: float = 9.0
    mid: float = 0.3
    jitter: float = 0.6
    unknown_penalty: float = 6.0
    swap: float = 0.015
    confusers: tuple[float, float, float, float, float, float] = (0.4, 0.25, 0.12, 0.08, 0.1, 0.05)
    lookalike: float = 0.03
    lookalike_mix: tuple[float, float] = (0.25, 0.75)
    lookalike_penalty: float = 2.0
    small_bird: float = 0.35
    small_other: float = 0.03
    ambiguity: float = 0.15
    small_confusers: float = 0.3
    small_bird_quality: tuple[float, float] = (2.0, 4.0)
    blankish_bird: float = 0.4
    blankish: float = 0.02
    blank_share: tuple[float, float] = (7.0, 2.0)
    bird_visitors: float = 0.2
    empty: float = 0.03
    empty_conf: tuple[float, float] = (1.6, 9.0)
    mix: float = 0.08
    detections_per_image: tuple[int, float] = (4, 0.62)
    images_per_burst: tuple[int, int] = (1, 5)
    prompt_alignment: float = 0.3


PRESETS: dict[str, Preset] = {
    "paper": Preset(),
    "hard": Preset(noise=0.65, offsets=(1.0, 0.8, 0.6, 0.4, 0.35), quality=(7.0, 1.4), competence=1.8, unknown=0.1,
                   swap=0.03, lookalike=0.05, small_bird=0.45, blankish=0.04, empty=0.05),
    "easy": Preset(noise=0.45, offsets=(1.0, 0.8, 0.6, 0.5, 0.6), quality=(9.0, 1.0), competence=1.0, unknown=0.02,
                   swap=0.005, lookalike=0.015, small_bird=0.25, blankish=0.01, empty=0.02),
    "small": Preset(detections=1_500, orders=(("mammalia", 3, 0.8), ("aves", 2, 0.12), ("reptilia", 1, 0.08)),
                    present=0.8, unknown=0.1, zipf=0.6),
    "scale": Preset(orders=(("mammalia", 20, 0.42), ("aves", 20, 0.42), ("reptilia", 8, 0.16)), families=(2, 6),
                    genera=(1, 5), species=(1, 5), present=1.0, unknown=0.02, zipf=0.0, competence=0.5,
                    small_bird=0.1, bird_visitors=0.05, images_per_burst=(1, 1), detections_per_image=(1, 0.0)),
}


@dataclass
class Dump:
    """One synthetic SD-card dump after pass 1: SpeciesNet's output, embeddings and the truth."""

    labels: list[str]
    scores: np.ndarray
    sources: list[str]
    det_conf: np.ndarray
    top_classes: list[list[str]]
    top_scores: list[list[float]]
    embeddings: np.ndarray
    image: np.ndarray
    burst: np.ndarray
    truth: list[str]
    is_bird: np.ndarray
    is_blank: np.ndarray
    is_unknown: np.ndarray
    taxonomy_labels: list[str]
    taxonomy_map: dict[str, str]
    prompts: np.ndarray
    bird_rows: tuple[int, ...] = (1,)
    species_present: int = 0
    unknown_species: int = 0

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Pass2:
    """What pass 2 did: stage masks, the stage-5 inputs and decisions, the final labels and stage times."""

    reference: np.ndarray
    bird: np.ndarray
    inputs: list[str]
    candidates: np.ndarray
    decisions: list[Optional[Decision]]
    final: list[str]
    centroids: Centroids
    config: StageConfig
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Node:
    """One taxon of the synthetic tree; `known` is False outside SpeciesNet's vocabulary."""

    key: str
    label: str
    rank: int
    parent: Optional["_Node"]
    known: bool = True

    def ancestor(self, rank: int) -> "_Node":
        """This node's ancestor at a rank (0 class .. 4 species)."""
        node = self
        while node.rank > rank:
            node = node.parent
        return node


def _label(ranks: Sequence[str], common: str) -> str:
    """A SpeciesNet 7-field label with a stable uuid (SpeciesNet's own for mammal and bird)."""
    key = ";".join(list(ranks) + [""] * (5 - len(ranks)))
    if len(ranks) == 1 and ranks[0] in CLASS_LABELS:
        return CLASS_LABELS[ranks[0]]
    return f"{uuid.uuid5(uuid.NAMESPACE_URL, 'trapedge-synthetic/' + key)};{key};{common}"


def _name(rng: np.random.Generator, used: set[str], suffix: str) -> str:
    """A fresh pseudo-Latin name."""
    while True:
        name = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))) + suffix
        if name not in used:
            used.add(name)
            return name


def _tree(preset: Preset, rng: np.random.Generator) -> list[_Node]:
    """All nodes of the tree, classes first; species last."""
    used: set[str] = set()
    nodes: list[_Node] = []

    def add(ranks: list[str], parent: Optional[_Node], common: str) -> _Node:
        node = _Node(";".join(ranks + [""] * (5 - len(ranks))), _label(ranks, common), len(ranks) - 1, parent)
        nodes.append(node)
        return node

    for cls, n_orders, _ in preset.orders:
        c = add([cls], None, CLASS_LABELS.get(cls, cls).split(";")[-1])
        for _ in range(n_orders):
            o_name = _name(rng, used, _SUFFIX["order"])
            o = add([cls, o_name], c, o_name)
            for _ in range(int(rng.integers(preset.families[0], preset.families[1] + 1))):
                f_name = _name(rng, used, _SUFFIX["family"])
                f = add([cls, o_name, f_name], o, f_name)
                for _ in range(int(rng.integers(preset.genera[0], preset.genera[1] + 1))):
                    g_name = _name(rng, used, _SUFFIX["genus"])
                    g = add([cls, o_name, f_name, g_name], f, g_name)
                    for _ in range(int(rng.integers(preset.species[0], preset.species[1] + 1))):
                        s_name = _name(rng, used, _SUFFIX["species"])
                        add([cls, o_name, f_name, g_name, s_name], g, f"{g_name} {s_name}")
    return nodes


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """n random unit vectors."""
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalised rows."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class _Vocabulary:
    """SpeciesNet's view of the tree: which labels it can output and how it confuses them."""

    def __init__(self, species: list[_Node], preset: Preset) -> None:
        self.preset = preset
        self.known_species = [s for s in species if s.known]
        self.under: dict[tuple[int, str], list[_Node]] = {}
        for o in self.known_species:
            for rank in range(4):
                self.under.setdefault((rank, o.ancestor(rank).key), []).append(o)
        self.pools = {s.key: self._pool(s) for s in species}
        self.anchor = {s.key: self._anchors(s) for s in species}

    def _relatives(self, s: _Node, rank: int) -> list[_Node]:
        """Known species sharing `s`'s ancestor at `rank` but not at the rank below (genus: all siblings)."""
        same = self.under.get((rank, s.ancestor(rank).key), [])
        return [o for o in same if o is not s and (rank == 3 or o.ancestor(rank + 1) is not s.ancestor(rank + 1))]

    def _pool(self, s: _Node) -> list[list[str]]:
        """Confuser labels by level: genus, family, order, class relatives, ancestors, other classes."""
        levels = [[o.label for o in self._relatives(s, rank)] for rank in (3, 2, 1, 0)]
        ancestors = [s.ancestor(rank).label for rank in (3, 2, 1, 0) if s.ancestor(rank).known]
        others = [o.label for o in self.known_species if o.ancestor(0) is not s.ancestor(0)]
        return levels + [ancestors, others]

    def _anchors(self, s: _Node) -> list[str]:
        """What SpeciesNet names as top-1: the species itself, or its nearest known relatives."""
        if s.known:
            return [s.label]
        for rank in (3, 2, 1, 0):
            near = self._relatives(s, rank)
            if near:
                return [o.label for o in near]
        return [o.label for o in self.known_species]

    def lookalike(self, s: _Node, rng: np.random.Generator) -> Optional[_Node]:
        """A known relative (same genus first, then family, then order) that a partial view can resemble."""
        for rank in (3, 2, 1):
            near = self._relatives(s, rank)
            if near:
                return near[int(rng.integers(len(near)))]
        return None

    def top5(self, s: _Node, quality: float, competence: float, blank: float, small: bool,
             rng: np.random.Generator, hint: Optional[str] = None) -> tuple[list[str], list[float]]:
        """SpeciesNet-like top-5 (labels, scores) for a crop of species `s`."""
        p = self.preset
        logit = p.gain * (quality - p.mid) + competence + rng.normal(0.0, p.jitter)
        if not s.known:
            logit -= p.unknown_penalty
        conf = 1.0 / (1.0 + math.exp(-logit))
        anchors = self.anchor[s.key]
        top = anchors[int(rng.integers(len(anchors)))]
        pool = self.pools[s.key]
        if s.known and pool[0] and rng.random() < p.swap:
            top = pool[0][int(rng.integers(len(pool[0])))]
        weights = np.array([w if level else 0.0 for w, level in zip(p.confusers, pool)])
        if small and pool[5]:
            weights[5] = max(weights[5], p.small_confusers)
        chosen: list[str] = [hint] if hint and hint != top else []
        for _ in range(12):
            if len(chosen) == 4 or weights.sum() <= 0:
                break
            level = pool[int(rng.choice(len(pool), p=weights / weights.sum()))]
            pick = level[int(rng.integers(len(level)))]
            if pick != top and pick not in chosen:
                chosen.append(pick)
        if s.known and top != s.label and s.label not in chosen:
            chosen = [s.label] + chosen[:3]
        rest = (1.0 - conf) * rng.uniform(0.75, 0.98) * rng.dirichlet(np.full(len(chosen), 0.8)) if chosen else []
        labels = [top] + chosen
        scores = [conf] + list(rest)
        scores = [x * (1.0 - blank) for x in scores]
        if blank > 0:
            labels.append(BLANK)
            scores.append(blank)
        order = np.argsort(scores, kind="stable")[::-1][:5]
        return [labels[i] for i in order], [float(scores[i]) for i in order]


def generate(preset: Preset, seed: int = 0) -> Dump:
    """Builds a seeded synthetic dump: tree, embeddings, SpeciesNet labels via the ensemble port, truth."""
    rng = np.random.default_rng(seed)
    nodes = _tree(preset, rng)
    species = [n for n in nodes if n.rank == 4]
    present_n = max(4, int(round(preset.present * len(species))))
    present = [species[i] for i in np.sort(rng.choice(len(species), present_n, replace=False))]
    abundance = 1.0 / np.arange(1, present_n + 1) ** preset.zipf
    abundance = abundance[rng.permutation(present_n)]
    class_of = [s.key.split(";")[0] for s in present]
    for cls, _, share in preset.orders:
        rows = [i for i, c in enumerate(class_of) if c == cls]
        if rows:
            abundance[rows] *= share / abundance[rows].sum()
    abundance /= abundance.sum()
    n_unknown = int(round(preset.unknown * present_n))
    rare = np.argsort(abundance, kind="stable")[: max(n_unknown, 2 * present_n // 3)]
    for i in rng.choice(rare, n_unknown, replace=False):
        present[i].known = False
    taxonomy_labels = [n.label for n in nodes if n.known]
    taxonomy_map = {get_full_class_string(label): label for label in taxonomy_labels}
    for special in (Classification.HUMAN, Classification.ANIMAL):
        taxonomy_map[get_full_class_string(special.value)] = special.value

    dim = preset.dim
    direction = {n.key: d for n, d in zip(nodes, _unit(rng, len(nodes), dim))}
    means = {}
    for s in species:
        mu = sum(preset.offsets[r] * direction[s.ancestor(r).key] for r in range(5))
        means[s.key] = mu / np.linalg.norm(mu)
    background_dir = _unit(rng, 1, dim)[0]
    nuisance = np.linalg.qr(rng.standard_normal((dim, preset.nuisance_rank)))[0]
    competence = {s.key: rng.normal(0.0, preset.competence) for s in present}

    prompt_dirs = np.stack([direction.get(f"{c};;;;", _unit(rng, 1, dim)[0]) for c in PROMPTS[:3]] + [background_dir])
    birds_present = [i for i, s in enumerate(present) if s.key.startswith("aves;")]
    bird_abundance = abundance[birds_present] / abundance[birds_present].sum() if birds_present else None

    kinds: list[tuple[int, int, int, int]] = []
    image = burst = 0
    while len(kinds) < preset.detections:
        main = int(rng.choice(present_n, p=abundance))
        for _ in range(int(rng.integers(preset.images_per_burst[0], preset.images_per_burst[1] + 1))):
            n = 1 + int(rng.binomial(*preset.detections_per_image))
            for _ in range(n):
                other = rng.random() < preset.mix
                kinds.append((int(rng.choice(present_n, p=abundance)) if other else main, image, burst, 0))
            if birds_present and rng.random() < preset.bird_visitors:
                for _ in range(int(rng.integers(1, 3))):
                    kinds.append((birds_present[int(rng.choice(len(birds_present), p=bird_abundance))], image,
                                  burst, 1))
            if rng.random() < preset.empty * n:
                kinds.append((-1, image, burst, 0))
            image += 1
        burst += 1
    kinds = kinds[: preset.detections]

    vocab = _Vocabulary(present, preset)
    n_det = len(kinds)
    burst_z = rng.standard_normal((burst, preset.nuisance_rank))
    image_z = rng.standard_normal((image, preset.nuisance_rank))
    emb = np.zeros((n_det, dim))
    det_conf = np.zeros(n_det)
    top_classes: list[list[str]] = []
    top_scores: list[list[float]] = []
    truth: list[str] = []
    is_bird = np.zeros(n_det, dtype=bool)
    is_blank = np.zeros(n_det, dtype=bool)
    is_unknown = np.zeros(n_det, dtype=bool)
    images = np.array([k[1] for k in kinds])
    bursts = np.array([k[2] for k in kinds])
    noise = rng.standard_normal((n_det, dim)) / math.sqrt(dim)
    for i, (sp, img, bst, visitor) in enumerate(kinds):
        z = burst_z[bst] + 0.5 * image_z[img]
        scene = background_dir + preset.nuisance * (nuisance @ z) / math.sqrt(preset.nuisance_rank)
        if sp < 0:
            is_blank[i] = True
            truth.append(BLANK)
            det_conf[i] = rng.beta(*preset.empty_conf)
            blank = float(rng.uniform(0.6, 0.999))
            others = [vocab.known_species[int(j)].label for j in rng.choice(len(vocab.known_species), 4, False)]
            rest = (1.0 - blank) * rng.uniform(0.3, 0.9) * rng.dirichlet(np.ones(4))
            top_classes.append([BLANK] + others)
            top_scores.append([blank] + [float(x) for x in rest])
            emb[i] = preset.background * 1.6 * scene + preset.noise * 1.3 * noise[i]
            continue
        s = present[sp]
        bird = s.key.startswith("aves;")
        small = (visitor or rng.random() < preset.small_bird) if bird else rng.random() < preset.small_other
        q = rng.beta(*preset.small_bird_quality) if small else rng.beta(*preset.quality)
        blankish = rng.random() < (preset.blankish_bird if small else preset.blankish)
        blank = float(rng.beta(*preset.blank_share)) if blankish else 0.0
        det_conf[i] = float(np.clip((0.08 + 0.9 * q) * (1.0 - 0.6 * blank) + rng.normal(0.0, 0.08), 0.01, 0.99))
        look = vocab.lookalike(s, rng) if rng.random() < preset.lookalike else None
        mix = float(rng.uniform(*preset.lookalike_mix)) if look else 0.0
        classes, scores = vocab.top5(s, q, competence[s.key] - (preset.lookalike_penalty if look else 0.0), blank,
                                     small, rng, look.label if look else None)
        top_classes.append(classes)
        top_scores.append(scores)
        truth.append(s.label)
        is_bird[i], is_unknown[i] = bird, not s.known
        visible = 0.25 + 0.75 * q
        sigma = preset.noise * (1.0 + preset.noise_quality * (1.0 - q)) * math.exp(rng.normal(0, preset.noise_jitter))
        mean = (1.0 - mix) * means[s.key] + (mix * means[look.key] if look else 0.0)
        emb[i] = visible * mean + preset.background * (1.2 - visible) * scene + sigma * noise[i]
        if small:
            emb[i] += preset.ambiguity * (rng.standard_normal(len(prompt_dirs)) @ prompt_dirs)
    emb = _normalise(emb).astype(np.float32)

    ensemble = Ensemble(taxonomy_map, {}, enable_geofence=False)
    decided = ensemble.decide([{"classes": c, "scores": s} for c, s in zip(top_classes, top_scores)],
                              [{"label": "animal", "conf": float(c)} for c in det_conf])
    gap = _unit(rng, 1, dim)[0]
    a = preset.prompt_alignment
    prompts = _normalise(a * prompt_dirs + math.sqrt(1 - a * a) * gap)
    return Dump(
        labels=[d["class"] for d in decided],
        scores=np.array([d["score"] for d in decided]),
        sources=[d["source"] for d in decided],
        det_conf=det_conf,
        top_classes=top_classes,
        top_scores=top_scores,
        embeddings=emb,
        image=images,
        burst=bursts,
        truth=truth,
        is_bird=is_bird,
        is_blank=is_blank,
        is_unknown=is_unknown,
        taxonomy_labels=taxonomy_labels,
        taxonomy_map=taxonomy_map,
        prompts=prompts.astype(np.float32),
        species_present=present_n,
        unknown_species=n_unknown,
    )


def is_correct(label: str, truth: str) -> bool:
    """Hierarchical correctness: the true species lies in `label`'s subtree (a blank is never an animal)."""
    if truth == BLANK:
        return label == BLANK
    depth = label_depth(label)
    if depth < 0:
        return False
    return split_label(label)[1:1 + depth] == split_label(truth)[1:1 + depth]


def run_pass2(dump: Dump, config: StageConfig, use_prompts: bool = True,
              allowed: Callable[[str], bool] = lambda _: True) -> Pass2:
    """Stages 1 (accept), 2 (birds), 3 (centroids on the references) and 5 (score), timed."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    reference = accept(dump.labels, dump.scores, dump.sources, config)
    seconds["accept"] = time.perf_counter() - t
    t = time.perf_counter()
    mass = aves_mass(dump.top_classes, dump.top_scores)
    prompt = bird_probability(dump.embeddings, dump.prompts, dump.bird_rows) if use_prompts else None
    bird = birds(dump.labels, dump.det_conf, mass, prompt, config)
    aves = dump.taxonomy_map["aves;;;;"]
    inputs = [aves if b else lab for lab, b in zip(dump.labels, bird)]
    seconds["birds"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = np.flatnonzero(reference)
    cents = build_centroids(dump.embeddings[rows], [dump.labels[i] for i in rows], dump.taxonomy_map, config)
    seconds["centroids"] = time.perf_counter() - t
    t = time.perf_counter()
    candidates = np.flatnonzero(~reference & np.array([label_depth(lab) < 5 for lab in inputs]))
    decisions = score(dump.embeddings[candidates], [inputs[i] for i in candidates], dump.det_conf[candidates],
                      cents, allowed, config)
    seconds["score"] = time.perf_counter() - t
    seconds["total"] = sum(seconds.values())
    final = list(inputs)
    for i, d in zip(candidates, decisions):
        if d is not None:
            final[i] = d.label
    return Pass2(reference, bird, inputs, candidates, decisions, final, cents, config, seconds)


def _in_play(dump: Dump, p2: Pass2) -> np.ndarray:
    """Candidates stage 5 may change: blanks below the detector floor are out for every method."""
    return np.array([not (p2.inputs[i] == BLANK and dump.det_conf[i] < p2.config.blank_floor)
                     for i in p2.candidates], dtype=bool)


def nearest_centroid(dump: Dump, p2: Pass2) -> list[str]:
    """Baseline (a): every candidate goes to its nearest descendant species centroid, no threshold or margin."""
    final = list(p2.final)
    species = np.array([lev == "species" for lev in p2.centroids.levels])
    cache: dict[str, np.ndarray] = {}
    for i, ok in zip(p2.candidates, _in_play(dump, p2)):
        final[i] = p2.inputs[i]
        if not ok:
            continue
        original = p2.inputs[i]
        if original not in cache:
            cache[original] = np.flatnonzero(species & np.array(
                [is_descendant(lab, original) for lab in p2.centroids.labels], dtype=bool))
        rows = cache[original]
        if rows.size:
            x = dump.embeddings[i].astype(np.float64)
            final[i] = p2.centroids.labels[rows[int(np.argmax(p2.centroids.vectors[rows] @ x))]]
    return final


def smoothing(dump: Dump, p2: Pass2) -> list[str]:
    """Baseline (b): a candidate copies the dominant reference species of its image, else of its burst."""
    final = list(p2.final)
    by_image: dict[int, list[str]] = {}
    by_burst: dict[int, list[str]] = {}
    for i in np.flatnonzero(p2.reference):
        by_image.setdefault(int(dump.image[i]), []).append(dump.labels[i])
        by_burst.setdefault(int(dump.burst[i]), []).append(dump.labels[i])
    for i, ok in zip(p2.candidates, _in_play(dump, p2)):
        final[i] = p2.inputs[i]
        if not ok:
            continue
        for group in (by_image.get(int(dump.image[i]), []), by_burst.get(int(dump.burst[i]), [])):
            votes = [lab for lab in group if is_descendant(lab, p2.inputs[i])]
            if votes:
                final[i] = max(sorted(set(votes)), key=votes.count)
                break
    return final


_COUNTS = ("candidates", "reclassified", "correct", "species_level", "unknown_candidates", "unknown_forced",
           "out_of_vocabulary_candidates", "out_of_vocabulary_forced", "to_no_cv_result", "blank_candidates",
           "blanks_made_animal")
_RATES = {"coverage": ("reclassified", "candidates"), "accuracy": ("correct", "reclassified"),
          "species_share": ("species_level", "reclassified"), "unknown_forced_share": ("unknown_forced",
                                                                                       "unknown_candidates")}


def _rate(num: int, den: int) -> Optional[float]:
    """num / den, or None for an empty denominator."""
    return num / den if den else None


def _with_rates(counts: dict) -> dict:
    """Adds the rates (coverage, accuracy, species share, unknowns forced) to a dict of counts."""
    return {**counts, **{k: _rate(counts[a], counts[b]) for k, (a, b) in _RATES.items()}}


def evaluate(dump: Dump, p2: Pass2, final: Sequence[str]) -> dict:
    """The paper's metrics on the stage-5 candidates in play (stage-2 birds reported apart, as in the paper).

    A genus/family/order label is correct when the true species lies in it; "unknown" means a true species
    with no species centroid (outside SpeciesNet's vocabulary, or too few references), which no method can name.
    """
    out: dict = {}
    play = _in_play(dump, p2)
    referenced = {lab for lab, level in zip(p2.centroids.labels, p2.centroids.levels) if level == "species"}
    for name, keep in (("reclassify", play & ~p2.bird[p2.candidates]), ("birds", play & p2.bird[p2.candidates])):
        rows = p2.candidates[keep]
        changed = [i for i in rows if final[i] != p2.inputs[i]]
        wrong = [i for i in changed if not is_correct(final[i], dump.truth[i])]
        unknown = [i for i in rows if not dump.is_blank[i] and dump.truth[i] not in referenced]
        vocab_out = [i for i in unknown if dump.is_unknown[i]]
        blanks = [i for i in rows if dump.is_blank[i]]
        out[name] = _with_rates({
            "candidates": len(rows),
            "reclassified": len(changed),
            "correct": len(changed) - len(wrong),
            "species_level": sum(label_depth(final[i]) == 5 for i in changed),
            "unknown_candidates": len(unknown),
            "unknown_forced": sum(label_depth(final[i]) == 5 for i in unknown),
            "out_of_vocabulary_candidates": len(vocab_out),
            "out_of_vocabulary_forced": sum(label_depth(final[i]) == 5 for i in vocab_out),
            "to_no_cv_result": sum(final[i] == Classification.UNKNOWN.value for i in changed),
            "blank_candidates": len(blanks),
            "blanks_made_animal": sum(final[i] != p2.inputs[i] for i in blanks),
            "errors": _errors(dump, wrong, final, referenced),
        })
    return out


def _errors(dump: Dump, wrong: Sequence[int], final: Sequence[str], referenced: set[str]) -> dict[str, int]:
    """Wrong re-classifications by cause."""
    out = {"to_no_cv_result": 0, "blank_made_animal": 0, "unknown_forced": 0, "unknown_other": 0,
           "wrong_species": 0, "wrong_group": 0}
    for i in wrong:
        if final[i] == Classification.UNKNOWN.value:
            out["to_no_cv_result"] += 1
        elif dump.is_blank[i]:
            out["blank_made_animal"] += 1
        elif dump.truth[i] not in referenced:
            out["unknown_forced" if label_depth(final[i]) == 5 else "unknown_other"] += 1
        else:
            out["wrong_species" if label_depth(final[i]) == 5 else "wrong_group"] += 1
    return out


def _pool(runs: Sequence[dict]) -> dict:
    """Sums the counts of several evaluate() results and recomputes the rates."""
    out = {}
    for group in runs[0]:
        counts = {k: sum(r[group][k] for r in runs) for k in _COUNTS}
        counts["errors"] = {k: sum(r[group]["errors"][k] for r in runs) for k in runs[0][group]["errors"]}
        out[group] = _with_rates(counts)
    accuracy = [r["reclassify"]["accuracy"] for r in runs if r["reclassify"]["accuracy"] is not None]
    out["accuracy_range"] = [min(accuracy), max(accuracy)] if accuracy else None
    return out


def bird_override(dump: Dump, p2: Pass2) -> dict:
    """Stage 2: how many blank/animal detections became birds, how many truly are, and the recall."""
    hidden = np.array([lab in (BLANK, ANIMAL) for lab in dump.labels]) & dump.is_bird
    return {"overrides": int(p2.bird.sum()), "correct": int((p2.bird & dump.is_bird).sum()),
            "hidden_birds": int(hidden.sum()), "recovered": int((p2.bird & hidden).sum())}


def _bird_rates(counts: dict) -> dict:
    """Adds accuracy and recall to stage-2 counts."""
    return {**counts, "accuracy": _rate(counts["correct"], counts["overrides"]),
            "recall": _rate(counts["recovered"], counts["hidden_birds"])}


def describe_dump(dump: Dump, p2: Pass2) -> dict:
    """Counts of what SpeciesNet produced and what the truth holds."""
    depth = np.array([label_depth(lab) for lab in dump.labels])
    no_cv = np.array([lab == Classification.UNKNOWN.value for lab in dump.labels])
    return {
        "detections": len(dump), "images": int(dump.image.max()) + 1, "bursts": int(dump.burst.max()) + 1,
        "species_present": dump.species_present, "unknown_species": dump.unknown_species,
        "taxonomy_labels": len(dump.taxonomy_labels), "centroids": len(p2.centroids),
        "references": int(p2.reference.sum()),
        "references_wrong": int(sum(dump.labels[i] != dump.truth[i] for i in np.flatnonzero(p2.reference))),
        "speciesnet_species": int((depth == 5).sum() - no_cv.sum()),
        "speciesnet_genus_to_class": int(((depth >= 1) & (depth <= 4)).sum()),
        "speciesnet_animal": int((depth == 0).sum()), "speciesnet_blank": sum(lab == BLANK for lab in dump.labels),
        "speciesnet_no_cv_result": int(no_cv.sum()), "no_cv_result_references": int((no_cv & p2.reference).sum()),
        "true_blanks": int(dump.is_blank.sum()), "true_birds": int(dump.is_bird.sum()),
        "unknown_species_detections": int(dump.is_unknown.sum()),
    }


def run_preset(name: str, preset: Preset, seeds: Sequence[int], sweep: bool) -> dict:
    """Scores every method on one dump per seed and pools the counts (Mahalanobis on the first seed only)."""
    per_seed, dumps = [], []
    for k, seed in enumerate(seeds):
        dump = generate(preset, seed)
        dumps.append(dump)
        cos = run_pass2(dump, StageConfig(scoring="cosine"))
        methods = {"cosine": evaluate(dump, cos, cos.final)}
        seconds = {"cosine": cos.seconds["total"]}
        shared = cos.seconds["total"] - cos.seconds["score"]
        for method, fn in (("nearest_centroid", nearest_centroid), ("smoothing", smoothing)):
            t = time.perf_counter()
            methods[method] = evaluate(dump, cos, fn(dump, cos))
            seconds[method] = shared + time.perf_counter() - t
        if k == 0:
            maha = run_pass2(dump, StageConfig(scoring="mahalanobis"))
            methods["mahalanobis"] = evaluate(dump, maha, maha.final)
            seconds["mahalanobis"] = maha.seconds["total"]
        per_seed.append({"seed": seed, "dump": describe_dump(dump, cos), "methods": methods, "seconds": seconds,
                         "stage_seconds": cos.seconds, "birds": bird_override(dump, cos),
                         "birds_aves_mass_only": bird_override(dump, run_pass2(dump, StageConfig(),
                                                                                use_prompts=False))})
    pooled = {m: _pool([s["methods"][m] for s in per_seed if m in s["methods"]])
              for m in ("cosine", "mahalanobis", "nearest_centroid", "smoothing")}
    birds = {key: _bird_rates({k: sum(s[key][k] for s in per_seed) for k in per_seed[0][key]})
             for key in ("birds", "birds_aves_mass_only")}
    seconds = {m: float(np.mean([s["seconds"][m] for s in per_seed if m in s["seconds"]])) for m in pooled}
    result = {"preset": name, "seeds": list(seeds), "methods": pooled, "seconds": seconds, **birds,
              "per_seed": per_seed, "params": asdict(preset)}
    if sweep:
        result["sweep"] = run_sweep(preset, max(seeds) + 1, dumps)
    return result


SWEEP = {"lam": (1.0, 1.5, 2.0, 3.0), "margin": (0.0, 0.02, 0.05), "t_max": (0.3, 0.5), "n_min": (3, 10)}


def run_sweep(preset: Preset, tune_seed: int, test_dumps: Sequence[Dump]) -> dict:
    """Cosine lam x margin x t_max x n_min tuned on another seed's dump; the pick re-measured on the test dumps."""
    tune = generate(preset, tune_seed)
    rows = []
    for lam in SWEEP["lam"]:
        for margin in SWEEP["margin"]:
            for t_max in SWEEP["t_max"]:
                for n_min in SWEEP["n_min"]:
                    cfg = StageConfig(lam=lam, margin=margin, t_max=t_max, n_min=n_min)
                    m = evaluate(tune, run := run_pass2(tune, cfg), run.final)["reclassify"]
                    rows.append({"lam": lam, "margin": margin, "t_max": t_max, "n_min": n_min,
                                 **{k: m[k] for k in ("accuracy", "species_share", "coverage", "unknown_forced_share",
                                                      "reclassified")}})
    default = next(r for r in rows if (r["lam"], r["margin"], r["t_max"], r["n_min"]) == (2.0, 0.02, 0.5, 3))
    ok = [r for r in rows if (r["accuracy"] or 0) >= TARGETS["accuracy"]
          and (r["unknown_forced_share"] or 0) <= TARGETS["unknown_forced"]]
    if ok:
        pick = max(ok, key=lambda r: ((r["species_share"] or 0) >= TARGETS["species_share"], r["coverage"] or 0))
    else:
        eligible = [r for r in rows if (r["coverage"] or 0) >= 0.5 * (default["coverage"] or 0)] or rows
        pick = max(eligible, key=lambda r: (r["accuracy"] or 0, r["coverage"] or 0))
    cfg = StageConfig(lam=pick["lam"], margin=pick["margin"], t_max=pick["t_max"], n_min=pick["n_min"])
    held = _pool([evaluate(d, run := run_pass2(d, cfg), run.final) for d in test_dumps])["reclassify"]
    return {"tune_seed": tune_seed, "grid": rows, "default_on_tune": default, "pick": pick, "pick_on_test": held,
            "pick_met_targets_on_tune": bool(ok)}


def run_timing(sizes: Sequence[int], seed: int) -> list[dict]:
    """Pass-2 wall time (cosine) on the "scale" tree, about 2,500 centroids, at each dump size."""
    out = []
    for n in sizes:
        dump = generate(replace(PRESETS["scale"], detections=n), seed)
        p2 = run_pass2(dump, StageConfig())
        entry = {"detections": n, "centroids": len(p2.centroids), "references": int(p2.reference.sum()),
                 "candidates": len(p2.candidates), "cosine_seconds": p2.seconds}
        if n <= 20_000:
            entry["mahalanobis_seconds"] = _mahalanobis_estimate(dump, p2)
        out.append(entry)
    return out


def _mahalanobis_estimate(dump: Dump, p2: Pass2, sample: int = 20) -> dict:
    """Mahalanobis pass 2 at scale: centroids timed in full, scoring timed on a random sample and extrapolated."""
    cfg = StageConfig(scoring="mahalanobis")
    rows = np.flatnonzero(p2.reference)
    t = time.perf_counter()
    cents = build_centroids(dump.embeddings[rows], [dump.labels[i] for i in rows], dump.taxonomy_map, cfg)
    fit_s = time.perf_counter() - t
    pick = np.sort(np.random.default_rng(0).choice(p2.candidates, min(sample, len(p2.candidates)), replace=False))
    t = time.perf_counter()
    score(dump.embeddings[pick], [p2.inputs[i] for i in pick], dump.det_conf[pick], cents, lambda _: True, cfg)
    per = (time.perf_counter() - t) / max(len(pick), 1)
    return {"centroids": fit_s, "score_per_candidate": per, "score_extrapolated": per * len(p2.candidates),
            "total_extrapolated": p2.seconds["accept"] + p2.seconds["birds"] + fit_s + per * len(p2.candidates),
            "sampled": len(pick)}


def _pct(x: Optional[float]) -> str:
    """A rate as a percentage."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


_SHORT = {"cosine": "cos", "mahalanobis": "mah*", "nearest_centroid": "nearest", "smoothing": "smooth"}


def _table(results: list[dict], timing: list[dict]) -> list[tuple[str, str]]:
    """Two-column rows for machine.write: one row per preset and metric, the four methods side by side."""
    rows: list[tuple[str, str]] = []
    for r in results:
        p, first = r["preset"], r["per_seed"][0]["dump"]
        seeds = r["seeds"]
        ms = r["methods"]

        def line(fmt: Callable[[dict], str], group: str = "reclassify") -> str:
            """One metric for every method."""
            return " · ".join(f"{_SHORT[m]} {fmt(v[group])}" for m, v in ms.items())

        rows.append((f"{p}: dump (seed {seeds[0]})",
                     f"{first['detections']} detections, {first['images']} images, {first['species_present']} species "
                     f"({first['unknown_species']} outside SpeciesNet), {first['references']} references "
                     f"({first['references_wrong']} wrong, {first['no_cv_result_references']} 'no cv result'), "
                     f"{first['centroids']} centroids"))
        rc = ms["cosine"]["reclassify"]
        rows.append((f"{p}: candidates, {len(seeds)} seeds (non-bird, in play)",
                     f"{rc['candidates']} ({rc['unknown_candidates']} of unreferenced species, "
                     f"{rc['blank_candidates']} true blanks)"))
        rows.append((f"{p}: accuracy (>= 96.5%)", line(lambda m: f"{_pct(m['accuracy'])} ({m['correct']}/"
                                                                 f"{m['reclassified']})")))
        rows.append((f"{p}: accuracy range over seeds", " · ".join(
            f"{_SHORT[m]} {_pct(v['accuracy_range'][0])}-{_pct(v['accuracy_range'][1])}"
            for m, v in ms.items() if v["accuracy_range"])))
        rows.append((f"{p}: coverage (re-classified / candidates)", line(lambda m: _pct(m["coverage"]))))
        rows.append((f"{p}: species level (>= 65%)", line(lambda m: _pct(m["species_share"]))))
        rows.append((f"{p}: unknowns forced (<= 2%)", line(lambda m: f"{_pct(m['unknown_forced_share'])} "
                                                                     f"({m['unknown_forced']})")))
        e = rc["errors"]
        rows.append((f"{p}: cosine errors by cause", ", ".join(f"{k} {v}" for k, v in e.items())))
        rows.append((f"{p}: true blanks made animal", line(lambda m: str(m["blanks_made_animal"]))))
        rows.append((f"{p}: stage-2 birds pushed below class", line(
            lambda m: f"{_pct(m['accuracy'])} of {m['reclassified']}", "birds")))
        b, bm = r["birds"], r["birds_aves_mass_only"]
        rows.append((f"{p}: bird override (>= 96.8%)",
                     f"{_pct(b['accuracy'])} ({b['correct']}/{b['overrides']}), recall {_pct(b['recall'])} of "
                     f"{b['hidden_birds']} hidden; aves mass alone {_pct(bm['accuracy'])} "
                     f"({bm['correct']}/{bm['overrides']})"))
        rows.append((f"{p}: pass 2 seconds (< 1 s)", " · ".join(f"{_SHORT[m]} {v:.2f}"
                                                               for m, v in r["seconds"].items())))
        if "sweep" in r:
            s = r["sweep"]
            k, h = s["pick"], s["pick_on_test"]
            rows.append((f"{p}: sweep pick (tuned on seed {s['tune_seed']}, measured on seeds {seeds})",
                         f"lam {k['lam']}, margin {k['margin']}, t_max {k['t_max']}, n_min {k['n_min']}: accuracy "
                         f"{_pct(h['accuracy'])}, species {_pct(h['species_share'])}, coverage "
                         f"{_pct(h['coverage'])}, unknowns forced {_pct(h['unknown_forced_share'])}"
                         + ("" if s["pick_met_targets_on_tune"] else " (no grid point met the targets)")))
    for t in timing:
        c = t["cosine_seconds"]
        text = (f"cosine {c['total']:.2f} s (accept {c['accept']:.2f}, birds {c['birds']:.2f}, centroids "
                f"{c['centroids']:.2f}, score {c['score']:.2f}); {t['centroids']} centroids, "
                f"{t['candidates']} candidates")
        if "mahalanobis_seconds" in t:
            m = t["mahalanobis_seconds"]
            text += (f"; mahalanobis ~{m['total_extrapolated']:.0f} s (centroids {m['centroids']:.1f} s, score "
                     f"extrapolated from {m['sampled']} candidates)")
        rows.append((f"timing: pass 2 at {t['detections']} detections", text))
    rows.append(("note", "mah* = Mahalanobis on the first seed only (its scoring is slow); accuracy counts a "
                         "genus/family/order label correct when the true species is in it"))
    return rows


def main() -> None:
    """CLI: runs the presets (and optionally the sweep and the timing) and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["paper", "hard", "easy"])
    parser.add_argument("--detections", type=int, default=None, help="override the preset's dump size")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="dumps per preset, pooled")
    parser.add_argument("--sweep", action="store_true", help="tune lam/margin/t_max/n_min on another seed")
    parser.add_argument("--timing", type=int, nargs="*", default=[15_000, 150_000], help="dump sizes to time")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    results = []
    seeds = list(range(args.seed, args.seed + args.seeds))
    for name in args.preset:
        preset = PRESETS[name] if args.detections is None else replace(PRESETS[name], detections=args.detections)
        results.append(run_preset(name, preset, seeds, args.sweep))
        print(f"{name} done", file=sys.stderr)
    timing = run_timing(args.timing, args.seed) if args.timing else []
    result = {"targets": TARGETS, "stage_config": StageConfig().to_dict(), "presets": results, "timing": timing,
              "machine": machine.describe()}
    print(machine.write("synthetic", result, _table(results, timing), args.out).read_text())


if __name__ == "__main__":
    main()
