"""Pass 2 on a seeded synthetic dump: the runtime's `pass_two` in each decision mode, against the paper's numbers.

The dump has a class > order > family > genus > species tree as SpeciesNet 7-field labels, hierarchical
embeddings (species mean plus crop-quality noise and per-scene background), SpeciesNet top-5 scores run
through trapedge's port of SpeciesNet's ensemble (so the roll-ups are SpeciesNet's own), hidden birds, empty
crops and species outside SpeciesNet's vocabulary. `generate` also renders what pass 1 stores for calibration:
degraded views of a bounded sample of each label's references (drawn like the dump's low-quality crops) and one
background view per sampled reference. `to_inputs` turns a dump into `PassTwoInputs` (SpeciesNet-format
predictions, embedding, evidence and degraded tables, events), and every method is one call of the runtime's
`pass_two`: decision "calibrated" (the default), "adaptive" (the paper's stage 5, cosine), "nearest",
"smoothing", and "adaptive" with Mahalanobis scoring. Writes results/synthetic.json and results/synthetic.md.

Crop quality in the evidence table: the box side is derived from the generator's crop quality q and its small
flag (`crop_side`); brightness and colourfulness are constants (`BRIGHTNESS`, `COLOURFULNESS`): the generator
has no pixels.

    python benchmarks/synthetic.py [--preset paper hard easy] [--detections N] [--seed S] [--seeds K] [--sweep]
                                   [--timing 15000 150000] [--memory-cap-gb G] [--mahalanobis-sample K]
                                   [--profile-over SECONDS] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import sys
import time
import tracemalloc
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402
from trapedge.runtime.speciesnet.ensemble import Classification, Ensemble  # noqa: E402
from trapedge.runtime.speciesnet.ensemble.taxonomy import get_full_class_string, split_label  # noqa: E402
from trapedge.runtime.reclassify import (  # noqa: E402
    DegradedTable,
    EmbeddingTable,
    EvidenceTable,
    PassTwoInputs,
    PassTwoResult,
    StageConfig,
    pass_two,
)
from trapedge.runtime.reclassify.degrade import ReferenceSampler  # noqa: E402
from trapedge.runtime.reclassify.stages import accept, build_centroids, label_depth, needs_embedding  # noqa: E402

__all__ = [
    "METHODS",
    "PRESETS",
    "Dump",
    "Preset",
    "Run",
    "bird_override",
    "candidates",
    "crop_side",
    "evaluate",
    "generate",
    "is_correct",
    "run_pass_two",
    "to_inputs",
]

BLANK = Classification.BLANK.value
ANIMAL = Classification.ANIMAL.value
CLASS_LABELS = {
    "mammalia": "f2d233e3-80e3-433d-9687-e29ecc7a467a;mammalia;;;;;mammal",
    "aves": "b1352069-a39c-4a84-a949-60044271c0c1;aves;;;;;bird",
}
PROMPTS = ("mammalia", "aves", "reptilia", "empty")
TARGETS = {"accuracy": 0.965, "species_share": 0.65, "bird_accuracy": 0.968, "unknown_forced": 0.02,
           "pass2_seconds": 1.0, "pass2_seconds_150k_2500_centroids": 3.0, "mahalanobis_mb_2500_centroids": 500}
BRIGHTNESS, COLOURFULNESS = 0.45, 0.12  # evidence-table constants: the generator draws no pixels
METHODS: dict[str, StageConfig] = {
    "calibrated": StageConfig(decision="calibrated"),
    "adaptive": StageConfig(decision="adaptive"),
    "mahalanobis": StageConfig(decision="adaptive", scoring="mahalanobis"),
    "nearest": StageConfig(decision="nearest"),
    "smoothing": StageConfig(decision="smoothing"),
}
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
    """One synthetic SD-card dump after pass 1: SpeciesNet's output, embeddings, degraded views and the truth.

    `keys` is each detection's (filepath, detection index) in its image; `quality` the generator's crop quality
    (NaN for empty crops), `small` its small-crop flag, `side` the box side in pixels derived from them.
    """

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
    keys: list[tuple[str, int]]
    quality: np.ndarray
    small: np.ndarray
    side: np.ndarray
    degraded: DegradedTable
    bird_rows: tuple[int, ...] = (1,)
    species_present: int = 0
    unknown_species: int = 0

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Run:
    """One `pass_two` call on a dump, its decisions laid out per detection, and its wall time.

    `reference`: stage "accept"; `relabelled`: any other stage; `bird`: a blank/animal detection put into class
    aves by the bird evidence (stage "birds", or `via` "birds"); `final`: the label after pass 2.
    """

    config: StageConfig
    result: PassTwoResult
    reference: np.ndarray
    relabelled: np.ndarray
    bird: np.ndarray
    final: list[str]
    seconds: float


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


def crop_side(quality: float, small: bool) -> float:
    """A plausible box side in source pixels for a crop of the generator's quality (small crops: 12-64 px)."""
    return 12.0 + 52.0 * quality if small else 24.0 + 400.0 * quality


def _empty_side(det_conf: float) -> float:
    """Box side of an empty (false) detection: larger boxes for more confident false detections."""
    return 16.0 + 200.0 * det_conf


def generate(preset: Preset, seed: int = 0, stages: StageConfig = StageConfig()) -> Dump:
    """Builds a seeded synthetic dump: tree, embeddings, SpeciesNet labels via the ensemble port, truth, and the
    degraded reference views pass 1 would store (`stages.degraded_per_label` references per label, drawn with
    their own generator so the dump itself does not depend on them)."""
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

    def scene_of(img: int, bst: int) -> np.ndarray:
        """The background a crop of this image shares with its burst."""
        z = burst_z[bst] + 0.5 * image_z[img]
        return background_dir + preset.nuisance * (nuisance @ z) / math.sqrt(preset.nuisance_rank)

    def empty_crop(scene: np.ndarray, noise_vec: np.ndarray, r: np.random.Generator):
        """An empty crop: scene plus noise, SpeciesNet's top-5 led by blank."""
        blank = float(r.uniform(0.6, 0.999))
        others = [vocab.known_species[int(j)].label for j in r.choice(len(vocab.known_species), 4, False)]
        rest = (1.0 - blank) * r.uniform(0.3, 0.9) * r.dirichlet(np.ones(4))
        vec = preset.background * 1.6 * scene + preset.noise * 1.3 * noise_vec
        return vec, ([BLANK] + others, [blank] + [float(x) for x in rest])

    def animal_crop(s: _Node, q: float, small: bool, blank: float, look: Optional[_Node], mix: float,
                    comp: float, scene: np.ndarray, noise_vec: np.ndarray, r: np.random.Generator):
        """A crop of species `s` at quality q: mean fading and noise growing as q falls, SpeciesNet's top-5."""
        top = vocab.top5(s, q, comp, blank, small, r, look.label if look else None)
        visible = 0.25 + 0.75 * q
        sigma = preset.noise * (1.0 + preset.noise_quality * (1.0 - q)) * math.exp(r.normal(0, preset.noise_jitter))
        mean = (1.0 - mix) * means[s.key] + (mix * means[look.key] if look else 0.0)
        vec = visible * mean + preset.background * (1.2 - visible) * scene + sigma * noise_vec
        if small:
            vec += preset.ambiguity * (r.standard_normal(len(prompt_dirs)) @ prompt_dirs)
        return vec, top

    emb = np.zeros((n_det, dim))
    det_conf = np.zeros(n_det)
    quality = np.full(n_det, np.nan)
    small_crop = np.zeros(n_det, dtype=bool)
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
        scene = scene_of(img, bst)
        if sp < 0:
            is_blank[i] = True
            truth.append(BLANK)
            det_conf[i] = rng.beta(*preset.empty_conf)
            emb[i], (classes, scores) = empty_crop(scene, noise[i], rng)
            top_classes.append(classes)
            top_scores.append(scores)
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
        emb[i], (classes, scores) = animal_crop(
            s, q, small, blank, look, mix, competence[s.key] - (preset.lookalike_penalty if look else 0.0), scene,
            noise[i], rng)
        top_classes.append(classes)
        top_scores.append(scores)
        truth.append(s.label)
        quality[i], small_crop[i] = q, small
        is_bird[i], is_unknown[i] = bird, not s.known
    emb = _normalise(emb).astype(np.float32)
    side = np.array([_empty_side(c) if np.isnan(q) else crop_side(q, sm)
                     for q, sm, c in zip(quality, small_crop, det_conf)])

    ensemble = Ensemble(taxonomy_map, {}, enable_geofence=False)
    decided = ensemble.decide([{"classes": c, "scores": s} for c, s in zip(top_classes, top_scores)],
                              [{"label": "animal", "conf": float(c)} for c in det_conf])
    gap = _unit(rng, 1, dim)[0]
    a = preset.prompt_alignment
    prompts = _normalise(a * prompt_dirs + math.sqrt(1 - a * a) * gap)
    labels = [d["class"] for d in decided]
    scores = np.array([d["score"] for d in decided])
    sources = [d["source"] for d in decided]
    keys, per_image = [], Counter()
    for img in images.tolist():
        keys.append((f"dump/{bursts[len(keys)]:06d}/{img:07d}.jpg", per_image[img]))
        per_image[img] += 1

    # Pass 1's degraded views: the runtime's sampler picks the first references of each label in card order; each
    # gets `degraded_views` views of its true species at the quality of a coarse candidate of this card (pass 1
    # shrinks views to the card's coarse-candidate box sides), drawn like the dump's crops, and one background view
    # of its own image drawn like an empty crop. Labels are the reference's SpeciesNet label, as pass 1 stores them.
    vrng = np.random.default_rng([seed, 2])
    refs = accept(labels, scores, sources, stages)
    coarse = [i for i in range(n_det) if not is_blank[i] and not refs[i] and needs_embedding(labels[i])
              and label_depth(labels[i]) < 5]
    sampler = ReferenceSampler(stages.degraded_per_label)
    deg = {"filepaths": [], "detections": [], "labels": [], "kinds": [], "vectors": [], "top_classes": [],
           "top_scores": [], "quality": []}

    def add_view(i: int, label: str, kind: str, vec: np.ndarray, top: tuple, view_side: float) -> None:
        deg["filepaths"].append(keys[i][0])
        deg["detections"].append(keys[i][1])
        deg["labels"].append(label)
        deg["kinds"].append(kind)
        deg["vectors"].append(vec)
        deg["top_classes"].append(top[0])
        deg["top_scores"].append(top[1])
        deg["quality"].append((view_side, BRIGHTNESS, COLOURFULNESS))

    if stages.degraded_views > 0:
        for i in np.flatnonzero(refs):
            if not sampler.take(labels[i]):
                continue
            sp, img, bst, _ = kinds[i]
            scene = scene_of(img, bst)
            for _ in range(stages.degraded_views):
                noise_vec = vrng.standard_normal(dim) / math.sqrt(dim)
                if sp < 0:
                    vec, top = empty_crop(scene, noise_vec, vrng)
                    add_view(i, labels[i], "empty", vec, top, side[i])
                    continue
                j = coarse[int(vrng.integers(len(coarse)))] if coarse else -1
                q, small = (quality[j], bool(small_crop[j])) if j >= 0 else \
                    (float(vrng.beta(*preset.small_bird_quality)), True)
                blank = float(vrng.beta(*preset.blank_share)) \
                    if vrng.random() < (preset.blankish_bird if small else preset.blankish) else 0.0
                vec, top = animal_crop(present[sp], q, small, blank, None, 0.0, competence[present[sp].key], scene,
                                       noise_vec, vrng)
                add_view(i, labels[i], "small" if small else "low", vec, top, crop_side(q, small))
            vec, top = empty_crop(scene, vrng.standard_normal(dim) / math.sqrt(dim), vrng)
            add_view(i, BLANK, "background", vec, top, side[i])
    n_views = len(deg["labels"])
    degraded = DegradedTable(
        deg["filepaths"], np.array(deg["detections"], dtype=np.int64), deg["labels"], deg["kinds"],
        _normalise(np.array(deg["vectors"], dtype=np.float64).reshape(n_views, dim)).astype(np.float32),
        deg["top_classes"], deg["top_scores"], np.array(deg["quality"], dtype=np.float32).reshape(n_views, 3))
    return Dump(
        labels=labels,
        scores=scores,
        sources=sources,
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
        keys=keys,
        quality=quality,
        small=small_crop,
        side=side,
        degraded=degraded,
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


def to_inputs(dump: Dump) -> PassTwoInputs:
    """What pass 1 stores for this dump: SpeciesNet-format predictions (one per image), the embedding and evidence
    tables of the detections pass 2 works on, the degraded reference views, and the events (filepath -> burst)."""
    predictions: list[dict] = []
    by_file: dict[str, dict] = {}
    rows = []
    for i, (fp, d) in enumerate(dump.keys):
        pred = by_file.get(fp)
        if pred is None:
            pred = by_file[fp] = {"filepath": fp, "detections": []}
            predictions.append(pred)
        w, h = min(dump.side[i] / 1920.0, 0.95), min(dump.side[i] / 1440.0, 0.95)
        pred["detections"].append({
            "category": "1", "label": "animal", "conf": float(dump.det_conf[i]),
            "bbox": [round(0.02 + 0.03 * (d % 10), 4), 0.02, round(w, 4), round(h, 4)],
            "processed_classification": {"class": dump.labels[i], "score": float(dump.scores[i]),
                                         "source": dump.sources[i]},
            "raw_classifications": {"classes": list(dump.top_classes[i]), "scores": list(dump.top_scores[i])},
        })
        if needs_embedding(dump.labels[i]):
            rows.append(i)
    rows = np.array(rows, dtype=np.int64)
    filepaths = [dump.keys[i][0] for i in rows]
    detections = np.array([dump.keys[i][1] for i in rows], dtype=np.int64)
    quality = np.column_stack([dump.side[rows], np.full(len(rows), BRIGHTNESS), np.full(len(rows), COLOURFULNESS)])
    return PassTwoInputs(
        predictions=predictions,
        embeddings=EmbeddingTable(filepaths, detections, dump.embeddings[rows]),
        evidence=EvidenceTable(list(filepaths), detections.copy(), [list(dump.top_classes[i]) for i in rows],
                               [list(dump.top_scores[i]) for i in rows], quality.astype(np.float32)),
        degraded=dump.degraded,
        events={fp: f"burst{dump.burst[i]:06d}" for i, (fp, d) in enumerate(dump.keys) if d == 0},
    )


def run_pass_two(dump: Dump, config: StageConfig, inputs: Optional[PassTwoInputs] = None, prompts: bool = True,
                 allowed: Callable[[str], bool] = lambda _: True) -> Run:
    """The runtime's `pass_two` on the dump (bird prompts unless `prompts` is False), timed, decisions per detection."""
    inputs = inputs if inputs is not None else to_inputs(dump)
    t = time.perf_counter()
    result = pass_two(inputs, dump.taxonomy_map, allowed, config, prompts=dump.prompts if prompts else None,
                      bird_rows=dump.bird_rows if prompts else ())
    seconds = time.perf_counter() - t
    return _layout(dump, config, result, seconds)


def _layout(dump: Dump, config: StageConfig, result: PassTwoResult, seconds: float) -> Run:
    """Per-detection arrays from the decisions keyed by (filepath, detection index)."""
    n = len(dump)
    reference, relabelled, bird = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    final = list(dump.labels)
    index = {key: i for i, key in enumerate(dump.keys)}
    for key, decision in result.decisions.items():
        i = index[key]
        if decision["stage"] == "accept":
            reference[i] = True
            continue
        relabelled[i] = True
        final[i] = decision["class"]
        bird[i] = decision["stage"] == "birds" or decision.get("via") == "birds"
    return Run(config, result, reference, relabelled, bird, final, seconds)


def _referenced(dump: Dump, run: Run) -> set[str]:
    """Species with a centroid of their own: at least n_min references (what no method can name otherwise)."""
    counts = Counter(dump.labels[i] for i in np.flatnonzero(run.reference))
    return {lab for lab, c in counts.items() if c >= run.config.n_min and label_depth(lab) == 5}


def candidates(dump: Dump, run: Run) -> np.ndarray:
    """Detections in play for a re-label: not references, in pass 2's scope (blank, animal, class..genus), blanks
    below the detector floor out unless a method re-labelled them anyway (every re-label is counted)."""
    scope = np.array([not ref and needs_embedding(lab) and label_depth(lab) < 5
                      for lab, ref in zip(dump.labels, run.reference)], dtype=bool)
    faint = np.array([lab == BLANK and c < run.config.blank_floor for lab, c in zip(dump.labels, dump.det_conf)])
    return scope & (~faint | run.relabelled)


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


def evaluate(dump: Dump, run: Run) -> dict:
    """The paper's metrics on the candidates in play, bird re-labels reported apart (as in the paper).

    "reclassify": candidates the method did not put into class aves; a change is a label other than SpeciesNet's.
    "birds": blank/animal detections the bird evidence put into aves; a change is a label below class aves.
    A genus/family/order label is correct when the true species lies in it; "unknown" means a true species with
    no species centroid (outside SpeciesNet's vocabulary, or too few references), which no method can name.
    """
    out: dict = {}
    play = candidates(dump, run)
    referenced = _referenced(dump, run)
    aves = dump.taxonomy_map["aves;;;;"]
    final = run.final
    for name, keep in (("reclassify", play & ~run.bird), ("birds", play & run.bird)):
        rows = np.flatnonzero(keep)
        start = (lambda i: aves) if name == "birds" else (lambda i: dump.labels[i])
        changed = [i for i in rows if final[i] != start(i)]
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
            "blanks_made_animal": sum(final[i] != dump.labels[i] for i in blanks),
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


def bird_override(dump: Dump, run: Run) -> dict:
    """Blank/animal detections put into aves: how many, how many truly are birds, and the recall of hidden birds."""
    hidden = np.array([lab in (BLANK, ANIMAL) for lab in dump.labels]) & dump.is_bird
    return {"overrides": int(run.bird.sum()), "correct": int((run.bird & dump.is_bird).sum()),
            "hidden_birds": int(hidden.sum()), "recovered": int((run.bird & hidden).sum())}


def _bird_rates(counts: dict) -> dict:
    """Adds accuracy and recall to bird-override counts."""
    return {**counts, "accuracy": _rate(counts["correct"], counts["overrides"]),
            "recall": _rate(counts["recovered"], counts["hidden_birds"])}


def describe_dump(dump: Dump, run: Run) -> dict:
    """Counts of what SpeciesNet produced, what pass 1 stored and what the truth holds."""
    depth = np.array([label_depth(lab) for lab in dump.labels])
    no_cv = np.array([lab == Classification.UNKNOWN.value for lab in dump.labels])
    refs = np.flatnonzero(run.reference)
    cents = build_centroids(dump.embeddings[refs], [dump.labels[i] for i in refs], dump.taxonomy_map,
                            replace(run.config, scoring="cosine"))
    return {
        "detections": len(dump), "images": int(dump.image.max()) + 1, "bursts": int(dump.burst.max()) + 1,
        "species_present": dump.species_present, "unknown_species": dump.unknown_species,
        "taxonomy_labels": len(dump.taxonomy_labels), "centroids": len(cents),
        "references": int(run.reference.sum()),
        "references_wrong": int(sum(dump.labels[i] != dump.truth[i] for i in refs)),
        "degraded_views": len(dump.degraded.labels),
        "degraded_references": len(set(zip(dump.degraded.filepaths, dump.degraded.detections.tolist()))),
        "speciesnet_species": int((depth == 5).sum()),
        "speciesnet_genus_to_class": int(((depth >= 1) & (depth <= 4)).sum()),
        "speciesnet_animal": int((depth == 0).sum()), "speciesnet_blank": sum(lab == BLANK for lab in dump.labels),
        "speciesnet_no_cv_result": int(no_cv.sum()), "no_cv_result_references": int((no_cv & run.reference).sum()),
        "true_blanks": int(dump.is_blank.sum()), "true_birds": int(dump.is_bird.sum()),
        "unknown_species_detections": int(dump.is_unknown.sum()),
    }


def run_preset(name: str, preset: Preset, seeds: Sequence[int], sweep: bool) -> dict:
    """Every method on one dump per seed, counts pooled over seeds."""
    per_seed, dumps = [], []
    for seed in seeds:
        dump = generate(preset, seed)
        dumps.append(dump)
        inputs = to_inputs(dump)
        runs = {m: run_pass_two(dump, cfg, inputs) for m, cfg in METHODS.items()}
        aves_only = run_pass_two(dump, METHODS["adaptive"], inputs, prompts=False)
        per_seed.append({
            "seed": seed, "dump": describe_dump(dump, runs["adaptive"]),
            "methods": {m: evaluate(dump, r) for m, r in runs.items()},
            "seconds": {m: r.seconds for m, r in runs.items()},
            "counts": {m: r.result.counts for m, r in runs.items()},
            "birds": {m: bird_override(dump, r) for m, r in runs.items()},
            "birds_aves_mass_only": bird_override(dump, aves_only),
            "calibration": runs["calibrated"].result.calibration, "notes": runs["calibrated"].result.notes,
        })
    pooled = {m: _pool([s["methods"][m] for s in per_seed if m in s["methods"]]) for m in METHODS}
    birds = {m: _bird_rates({k: sum(s["birds"][m][k] for s in per_seed if m in s["birds"])
                             for k in per_seed[0]["birds"][m]}) for m in METHODS}
    aves_only = _bird_rates({k: sum(s["birds_aves_mass_only"][k] for s in per_seed)
                             for k in per_seed[0]["birds_aves_mass_only"]})
    seconds = {m: float(np.mean([s["seconds"][m] for s in per_seed if m in s["seconds"]])) for m in METHODS}
    result = {"preset": name, "seeds": list(seeds), "methods": pooled, "seconds": seconds, "birds": birds,
              "birds_aves_mass_only": aves_only, "per_seed": per_seed, "params": asdict(preset)}
    if sweep:
        result["sweep"] = run_sweep(preset, max(seeds) + 1, dumps)
    return result


SWEEP = {"lam": (1.0, 1.5, 2.0, 3.0), "margin": (0.0, 0.02, 0.05), "t_max": (0.3, 0.5), "n_min": (3, 10)}


def run_sweep(preset: Preset, tune_seed: int, test_dumps: Sequence[Dump]) -> dict:
    """Adaptive (cosine) lam x margin x t_max x n_min tuned on another seed's dump; the pick re-measured on the
    test dumps."""
    tune = generate(preset, tune_seed)
    inputs = to_inputs(tune)
    rows = []
    for lam in SWEEP["lam"]:
        for margin in SWEEP["margin"]:
            for t_max in SWEEP["t_max"]:
                for n_min in SWEEP["n_min"]:
                    cfg = StageConfig(decision="adaptive", lam=lam, margin=margin, t_max=t_max, n_min=n_min)
                    m = evaluate(tune, run_pass_two(tune, cfg, inputs))["reclassify"]
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
    cfg = StageConfig(decision="adaptive", lam=pick["lam"], margin=pick["margin"], t_max=pick["t_max"],
                      n_min=pick["n_min"])
    held = _pool([evaluate(d, run_pass_two(d, cfg)) for d in test_dumps])["reclassify"]
    return {"tune_seed": tune_seed, "grid": rows, "default_on_tune": default, "pick": pick, "pick_on_test": held,
            "pick_met_targets_on_tune": bool(ok)}


def _status_kb(field_name: str) -> int:
    """A VmXXX field of /proc/self/status in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def _capped(call: Callable[[], object], cap_gb: float) -> tuple[object, Optional[str]]:
    """Runs a call under an address-space cap of `cap_gb` more than now (Linux), so an oversized run fails with
    MemoryError instead of starving the shared machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _status_kb("VmSize") * 1024 + int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        return call(), None
    except MemoryError:
        return None, f"MemoryError: over the {cap_gb:g} GB address-space cap"
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def measure(call: Callable[[], PassTwoResult], cap_gb: float) -> dict:
    """Wall time of one call, then peak memory of a second, traced call: tracemalloc's peak of everything (Python
    objects and numpy buffers) allocated during it. Tracing slows a call, so the timed call is untraced."""
    gc.collect()
    t = time.perf_counter()
    result, error = _capped(call, cap_gb)
    seconds = time.perf_counter() - t
    peak_mb = None
    if error is None:
        gc.collect()
        tracemalloc.start()
        _, error = _capped(call, cap_gb)
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return {"seconds": seconds, "peak_mb": peak_mb, "error": error, "result": result}


def _profile(call: Callable[[], object], top: int = 15) -> list[str]:
    """cProfile of one more call: the top lines by cumulative time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    lines = out.getvalue().splitlines()
    start = next((k for k, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    return [line.replace(str(HERE.parent) + "/", "") for line in lines[start:] if line.strip()]


def run_timing(sizes: Sequence[int], seed: int, cap_gb: float = 6.0, mahalanobis_sample: int = 20,
               profile_over: Optional[float] = 3.0) -> list[dict]:
    """`pass_two` end to end on the "scale" tree (about 2,500 centroids) at each dump size: decision "calibrated"
    and "adaptive" (cosine), seconds and peak memory, and a cProfile (top 15 cumulative) of any call over
    `profile_over` seconds. At the smallest size also Mahalanobis (adaptive): all references (centroids and
    per-class covariances in full), a sample of candidates scored."""
    out = []
    for n in sizes:
        dump = generate(replace(PRESETS["scale"], detections=n), seed)
        inputs = to_inputs(dump)
        entry: dict = {"detections": n, "degraded_views": len(dump.degraded.labels), "memory": "tracemalloc peak "
                       "during a second, traced call (Python objects and numpy buffers)"}
        for mode in ("calibrated", "adaptive"):
            cfg = METHODS[mode]
            m = measure(lambda: pass_two(inputs, dump.taxonomy_map, lambda _: True, cfg, prompts=dump.prompts,
                                         bird_rows=dump.bird_rows), cap_gb)
            result = m.pop("result")
            if result is not None and profile_over is not None and m["seconds"] > profile_over:
                m["profile"] = _profile(lambda: pass_two(inputs, dump.taxonomy_map, lambda _: True, cfg,
                                                         prompts=dump.prompts, bird_rows=dump.bird_rows))
            if result is not None:
                m["counts"] = result.counts
                if mode == "adaptive":
                    run = _layout(dump, cfg, result, m["seconds"])
                    entry.update({k: describe_dump(dump, run)[k] for k in ("centroids", "references")})
                    entry["candidates"] = result.counts["candidates"]
                else:
                    m["levels"] = {lev: c.get("enabled") for lev, c in result.calibration.get("levels", {}).items()}
                    m["notes"] = result.notes
            entry[mode] = m
            print(f"timing {n} {mode}: {m['seconds']:.2f} s, {m['peak_mb'] or 0:.0f} MB {m['error'] or ''}",
                  file=sys.stderr)
        if n == min(sizes) and mahalanobis_sample:
            entry["mahalanobis"] = _mahalanobis(dump, inputs, mahalanobis_sample, cap_gb)
        out.append(entry)
        del dump, inputs
    return out


def _mahalanobis(dump: Dump, inputs: PassTwoInputs, sample: int, cap_gb: float) -> dict:
    """Mahalanobis `pass_two` (adaptive) with every reference but only `sample` candidates in the embedding table:
    centroids and per-class covariances (the memory) in full, scoring of a sample only (its time is far over
    target anyway; see the per-preset rows)."""
    cfg = METHODS["mahalanobis"]
    refs = accept(dump.labels, dump.scores, dump.sources, cfg)
    pool = np.flatnonzero(~refs & np.array([needs_embedding(lab) and label_depth(lab) < 5 for lab in dump.labels]))
    pick = np.random.default_rng(0).choice(pool, min(sample, len(pool)), replace=False)
    rows = np.sort(np.concatenate([np.flatnonzero(refs), pick]))
    table = EmbeddingTable([dump.keys[i][0] for i in rows], np.array([dump.keys[i][1] for i in rows]),
                           dump.embeddings[rows])
    subset = PassTwoInputs(inputs.predictions, table, inputs.evidence, None, inputs.events)
    m = measure(lambda: pass_two(subset, dump.taxonomy_map, lambda _: True, cfg, prompts=dump.prompts,
                                 bird_rows=dump.bird_rows), cap_gb)
    result = m.pop("result")
    entry = {**m, "sampled": len(pick), "candidates": len(pool), "references": int(refs.sum()),
             "dim": int(dump.embeddings.shape[1])}
    if result is not None:
        entry["counts"] = result.counts
    print(f"timing mahalanobis: {m['seconds']:.1f} s, {m['peak_mb'] or 0:.0f} MB {m['error'] or ''}",
          file=sys.stderr)
    return entry


def _pct(x: Optional[float]) -> str:
    """A rate as a percentage."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


_SHORT = {"calibrated": "cal", "adaptive": "cos", "mahalanobis": "mah", "nearest": "nearest", "smoothing": "smooth"}


def _levels(calibration: dict) -> str:
    """The calibrated levels of one run: threshold and precision bound, or off."""
    parts = []
    for level, c in calibration.get("levels", {}).items():
        if c.get("enabled"):
            parts.append(f"{level} p>={c['threshold']:.2f} (bound {_pct(c['lower_bound'])} on {c['accepted']})")
        else:
            parts.append(f"{level} off")
    return ", ".join(parts) or "off"


def _table(results: list[dict], timing: list[dict]) -> list[tuple[str, str]]:
    """Two-column rows for machine.write: one row per preset and metric, the five methods side by side."""
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
                     f"({first['references_wrong']} wrong), {first['centroids']} centroids, "
                     f"{first['degraded_views']} degraded views of {first['degraded_references']} references"))
        rc = ms["adaptive"]["reclassify"]
        rows.append((f"{p}: candidates, {len(seeds)} seeds (non-bird, in play)",
                     line(lambda m: f"{m['candidates']}") + f" (cos: {rc['unknown_candidates']} of unreferenced "
                     f"species, {rc['blank_candidates']} true blanks)"))
        rows.append((f"{p}: accuracy (>= 96.5%)", line(lambda m: f"{_pct(m['accuracy'])} ({m['correct']}/"
                                                                 f"{m['reclassified']})")))
        rows.append((f"{p}: accuracy range over seeds", " · ".join(
            f"{_SHORT[m]} {_pct(v['accuracy_range'][0])}-{_pct(v['accuracy_range'][1])}"
            for m, v in ms.items() if v["accuracy_range"])))
        rows.append((f"{p}: coverage (re-classified / candidates)", line(lambda m: _pct(m["coverage"]))))
        rows.append((f"{p}: species level (>= 65%)", line(lambda m: _pct(m["species_share"]))))
        rows.append((f"{p}: unknowns forced (<= 2%)", line(lambda m: f"{_pct(m['unknown_forced_share'])} "
                                                                     f"({m['unknown_forced']})")))
        for m in ("calibrated", "adaptive"):
            e = ms[m]["reclassify"]["errors"]
            rows.append((f"{p}: {_SHORT[m]} errors by cause", ", ".join(f"{k} {v}" for k, v in e.items())))
        rows.append((f"{p}: true blanks made animal", line(lambda m: str(m["blanks_made_animal"]))))
        rows.append((f"{p}: birds pushed below class", line(
            lambda m: f"{_pct(m['accuracy'])} of {m['reclassified']}", "birds")))
        b, bm = r["birds"], r["birds_aves_mass_only"]
        rows.append((f"{p}: bird override (>= 96.8%)", " · ".join(
            f"{_SHORT[m]} {_pct(b[m]['accuracy'])} ({b[m]['correct']}/{b[m]['overrides']}), recall "
            f"{_pct(b[m]['recall'])}" for m in ("calibrated", "adaptive", "mahalanobis", "nearest"))
            + f" of {b['adaptive']['hidden_birds']} hidden; cos aves mass alone {_pct(bm['accuracy'])} "
              f"({bm['correct']}/{bm['overrides']})"))
        rows.append((f"{p}: calibrated levels (target {StageConfig().target_precision:.0%}, seed {seeds[0]})", _levels(r["per_seed"][0]["calibration"])))
        rows.append((f"{p}: pass_two seconds (< 1 s)", " · ".join(f"{_SHORT[m]} {v:.2f}"
                                                                 for m, v in r["seconds"].items())))
        if "sweep" in r:
            s = r["sweep"]
            k, h = s["pick"], s["pick_on_test"]
            rows.append((f"{p}: cos sweep pick (tuned on seed {s['tune_seed']}, measured on seeds {seeds})",
                         f"lam {k['lam']}, margin {k['margin']}, t_max {k['t_max']}, n_min {k['n_min']}: accuracy "
                         f"{_pct(h['accuracy'])}, species {_pct(h['species_share'])}, coverage "
                         f"{_pct(h['coverage'])}, unknowns forced {_pct(h['unknown_forced_share'])}"
                         + ("" if s["pick_met_targets_on_tune"] else " (no grid point met the targets)")))
    def mb(m: dict) -> str:
        return "n/a" if m["peak_mb"] is None else f"{m['peak_mb']:.0f} MB"

    for t in timing:
        parts = []
        for mode in ("calibrated", "adaptive"):
            m = t[mode]
            parts.append(f"{mode} {m['seconds']:.2f} s, peak {mb(m)}" + (f" ({m['error']})" if m["error"] else ""))
        rows.append((f"timing: pass_two at {t['detections']} detections, scale preset (< 3 s at 150000)",
                     "; ".join(parts) + f"; {t.get('centroids', '?')} centroids, {t.get('references', '?')} "
                     f"references, {t.get('candidates', '?')} candidates, {t['degraded_views']} degraded views"
                     + "".join(f"; {note}" for note in t["calibrated"].get("notes", []) if "sample" in note)))
        if "mahalanobis" in t:
            m = t["mahalanobis"]
            rows.append((f"timing: Mahalanobis at {t.get('centroids', '?')} centroids (< 500 MB)",
                         f"peak {mb(m)}, {m['seconds']:.1f} s for pass_two with all {m['references']} references "
                         f"and {m['sampled']} of {m['candidates']} candidates (dim {m['dim']})"
                         + (f" ({m['error']})" if m["error"] else "")))
    rows.append(("note", f"cal = decision calibrated (default, target precision {StageConfig().target_precision}); "
                         "cos = adaptive (the old "
                         "default); mah = adaptive with Mahalanobis scoring; accuracy counts a genus/family/order "
                         "label correct when the true species is in it; seconds: one untraced pass_two call; memory: "
                         "tracemalloc peak of a second call"))
    return rows


# The benchmark's own copy of pass 2 before it called the runtime's `pass_two` (results/synthetic.md at commit
# 24cbc1e, same presets, seeds 0-2 and dumps): cos = stage 5 adaptive cosine, the old default.
BEFORE = [
    ("paper: accuracy", "cos 84.0% (1391/1656) · mah* 77.5% (107/138) · nearest 67.7% (2509/3708) · smooth 70.3% "
                        "(1419/2018)"),
    ("paper: coverage / species level", "cos 44.6% / 75.8% · mah* 14.8% / 68.8% · nearest 100.0% / 100.0% · smooth "
                                        "54.4% / 100.0%"),
    ("paper: unknowns forced", "cos 36.7% (186) · mah* 3.2% (2) · nearest 99.8% (506) · smooth 33.7% (171)"),
    ("paper: candidates; bird override", "3709 (507 of unreferenced species); 94.0% (834/887), recall 47.1% of 1770 "
                                         "hidden; aves mass alone 87.8% (302/344)"),
    ("paper: pass 2 seconds", "cos 0.51 · mah* 37.40 · nearest 0.40 · smooth 0.40"),
    ("hard: accuracy", "cos 71.0% (1089/1534) · mah* 58.6% (177/302) · nearest 48.0% (1750/3649) · smooth 68.7% "
                       "(1672/2433)"),
    ("hard: coverage / species level", "cos 42.0% / 56.9% · mah* 28.3% / 49.0% · nearest 99.9% / 100.0% · smooth "
                                       "66.6% / 100.0%"),
    ("hard: unknowns forced", "cos 33.4% (383) · mah* 8.1% (31) · nearest 99.6% (1142) · smooth 38.2% (438)"),
    ("hard: candidates; bird override", "3654 (1147 of unreferenced species); 96.4% (721/748), recall 42.9% of 1680 "
                                        "hidden; aves mass alone 91.0% (212/233)"),
    ("hard: pass 2 seconds", "cos 0.47 · mah* 17.61 · nearest 0.35 · smooth 0.35"),
    ("easy: accuracy", "cos 75.5% (302/400) · mah* 93.3% (42/45) · nearest 73.5% (1515/2062) · smooth 66.7% "
                       "(812/1217)"),
    ("easy: coverage / species level", "cos 19.4% / 65.5% · mah* 6.7% / 64.4% · nearest 100.0% / 100.0% · smooth "
                                       "59.0% / 100.0%"),
    ("easy: unknowns forced", "cos 27.2% (67) · mah* 0.0% (0) · nearest 100.0% (246) · smooth 43.5% (107)"),
    ("easy: candidates; bird override", "2062 (246 of unreferenced species); 97.3% (676/695), recall 44.8% of 1508 "
                                        "hidden; aves mass alone 95.7% (266/278)"),
    ("easy: pass 2 seconds", "cos 0.47 · mah* 32.68 · nearest 0.37 · smooth 0.36"),
    ("timing at 15000 (scale)", "cosine 2.40 s (stage functions only: accept 0.01, birds 0.05, centroids 0.29, score "
                                "2.04); 2482 centroids, 1709 candidates; mahalanobis ~364 s (centroids 199.8 s)"),
    ("timing at 150000 (scale)", "cosine 8.31 s (accept 0.11, birds 0.54, centroids 2.40, score 5.26); 2529 "
                                 "centroids, 16630 candidates"),
]


def _before_section() -> str:
    """Markdown: the old copy's numbers, for before/after."""
    lines = ["## before (old copy of pass 2)", "",
             "The benchmark's own stage calls (no degraded views, no calibrated mode), from results/synthetic.md at "
             "commit 24cbc1e; same presets, seeds and dumps (the generator draws them identically). Its \"cos\" is "
             "today's \"adaptive\" row; \"mah*\" was a per-class full covariance, first seed only. Its candidates "
             "also held SpeciesNet's \"no cv result\" detections (then also references), which pass_two never "
             "embeds.", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in BEFORE]
    return "\n".join(lines) + "\n"


def main() -> None:
    """CLI: runs the presets (and optionally the sweep and the timing) and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["paper", "hard", "easy"])
    parser.add_argument("--detections", type=int, default=None, help="override the preset's dump size")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="dumps per preset, pooled")
    parser.add_argument("--sweep", action="store_true", help="tune lam/margin/t_max/n_min on another seed")
    parser.add_argument("--timing", type=int, nargs="*", default=[15_000, 150_000], help="dump sizes to time")
    parser.add_argument("--memory-cap-gb", type=float, default=6.0, help="address-space cap per timed call")
    parser.add_argument("--mahalanobis-sample", type=int, default=20,
                        help="candidates scored in the Mahalanobis memory run (0: skip it)")
    parser.add_argument("--profile-over", type=float, default=3.0,
                        help="cProfile a timed call slower than this many seconds (negative: never)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    results = []
    seeds = list(range(args.seed, args.seed + args.seeds))
    for name in args.preset:
        preset = PRESETS[name] if args.detections is None else replace(PRESETS[name], detections=args.detections)
        results.append(run_preset(name, preset, seeds, args.sweep))
        print(f"{name} done", file=sys.stderr)
    timing = run_timing(args.timing, args.seed, args.memory_cap_gb, args.mahalanobis_sample,
                        args.profile_over if args.profile_over >= 0 else None) if args.timing else []
    result = {"targets": TARGETS, "stage_config": StageConfig().to_dict(), "methods": {
        m: cfg.to_dict() for m, cfg in METHODS.items()}, "presets": results, "timing": timing,
        "before": dict(BEFORE), "machine": machine.describe()}
    md = machine.write("synthetic", result, _table(results, timing), args.out)
    md.write_text(md.read_text() + "\n" + _before_section())
    print(md.read_text())


if __name__ == "__main__":
    main()
