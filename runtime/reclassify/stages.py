"""The five re-classification stages as pure functions over arrays (stage 4, the head, runs in `embed`).

Defaults are ours: the paper (arXiv 2510.14594) does not publish its thresholds. Every one is in
`StageConfig`, recorded in the bundle manifest and overridable by a config file and CLI flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np

from ..speciesnet.ensemble import Classification
from ..speciesnet.ensemble.taxonomy import LEVELS, get_ancestor_at_level, split_label

__all__ = [
    "Centroids",
    "DECISIONS",
    "Decision",
    "StageConfig",
    "accept",
    "aves_mass",
    "bird_probability",
    "birds",
    "build_centroids",
    "is_descendant",
    "label_depth",
    "needs_embedding",
    "score",
    "unit_rows",
]

SCORING = ("cosine", "mahalanobis")
DECISIONS = ("calibrated", "adaptive", "nearest", "smoothing")
_DEPTH = {"kingdom": 0, "class": 1, "order": 2, "family": 3, "genus": 4, "species": 5}
_AVES_CLASS_KEY = "aves;;;;"


@dataclass(frozen=True)
class StageConfig:
    """Every threshold of the five stages (defaults are trapedge's own, measured in benchmarks/).

    Attributes:
        tau_accept: stage 1, a species-level classifier label at or above this is a reference.
        accept_sources: stage 1, SpeciesNet prediction sources whose labels may be references.
        bird_prompt: stage 2, encoder bird-prompt probability (softmax over prompts) at or above this...
        bird_aves_mass: stage 2, ...or SpeciesNet's summed top-5 aves score at or above this, recovers a bird.
        bird_min_conf: stage 2, detector confidence a blank needs before it can become a bird.
        n_min: stage 3, references a label needs for its own centroid.
        lam: stage 5, adaptive threshold = mean + lam * std of the centroid's reference distances...
        t_min: stage 5, ...clipped below at this...
        t_max: stage 5, ...and above at this (cosine distance; Mahalanobis uses its own scale).
        margin: stage 5, the runner-up must be at least this much farther than the winner.
        blank_floor: stage 5, a blank needs this detector confidence before it can become an animal.
        levels: stage 5, the levels tried, most specific first.
        scoring: "cosine" (the paper) or "mahalanobis" (per-class covariance with shrinkage).
        shrinkage: Mahalanobis covariance shrinkage towards the pooled covariance (0..1).
        mahalanobis_t_max: upper clip of the Mahalanobis threshold (squared distance per dimension).
        decision: how coarse detections are re-labelled: "calibrated" (evidence model, precision bound on
            held-out degraded references; the default), "adaptive" (the paper's stage 5), "nearest" (nearest
            centroid, no threshold) or "smoothing" (the event's confident species, MegaDetector-style).
        target_precision: calibrated, each level's acceptance reaches this precision as a lower bound on the
            held-out degraded references (0.97: on benchmarks/hard_crops.py the card's precision runs about
            2 points below the calibration's, so 0.97 keeps a card at >= 0.95)...
        confidence: ...at this confidence (one-sided Clopper-Pearson).
        folds: calibrated, cross-fitting folds over the held-out references.
        ridge: calibrated, L2 penalty of the logistic evidence model (standardised features).
        calibrated_levels: calibrated, the levels tried, most specific first (class: birds and the like).
        calibration_views: calibrated, at most this many degraded views are used (a seeded sample, bounding
            the cost on cards with thousands of references).
        degraded_per_label: pass 1, references per label that get degraded views...
        degraded_views: ...and how many views each (plus one background patch).
    """

    tau_accept: float = 0.8
    accept_sources: tuple[str, ...] = ("classifier",)
    bird_prompt: float = 0.6
    bird_aves_mass: float = 0.5
    bird_min_conf: float = 0.1
    n_min: int = 3
    lam: float = 2.0
    t_min: float = 0.02
    t_max: float = 0.5
    margin: float = 0.02
    blank_floor: float = 0.2
    levels: tuple[str, ...] = ("species", "genus", "family", "order")
    scoring: str = "cosine"
    shrinkage: float = 0.5
    mahalanobis_t_max: float = 4.0
    decision: str = "calibrated"
    target_precision: float = 0.97
    confidence: float = 0.95
    folds: int = 5
    ridge: float = 1.0
    calibrated_levels: tuple[str, ...] = ("species", "genus", "family", "order", "class")
    calibration_views: int = 4000
    degraded_per_label: int = 20
    degraded_views: int = 3

    def __post_init__(self) -> None:
        if self.scoring not in SCORING:
            raise ValueError(f"scoring must be one of {SCORING}, got {self.scoring!r}")
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {self.decision!r}")
        if not 0 < self.target_precision < 1 or not 0 < self.confidence < 1:
            raise ValueError("target_precision and confidence must be within (0, 1)")
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        unknown = (set(self.levels) | set(self.calibrated_levels)) - set(_DEPTH)
        if unknown:
            raise ValueError(f"unknown taxonomic levels {sorted(unknown)}")
        if not 0 <= self.shrinkage <= 1:
            raise ValueError(f"shrinkage must be within [0, 1], got {self.shrinkage}")

    def to_dict(self) -> dict:
        """Plain dict (for the manifest and the run record)."""
        out = asdict(self)
        out["accept_sources"] = list(self.accept_sources)
        out["levels"] = list(self.levels)
        out["calibrated_levels"] = list(self.calibrated_levels)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> StageConfig:
        """Builds a config from a dict, refusing unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown stage settings: {', '.join(sorted(unknown))}")
        clean = dict(values)
        for key in ("accept_sources", "levels", "calibrated_levels"):
            if key in clean:
                clean[key] = tuple(clean[key])
        return cls(**clean)


@lru_cache(maxsize=65536)
def label_depth(label: str) -> int:
    """0 for animal (kingdom) up to 5 for species; -1 for labels outside the tree (blank, vehicle, unknown)."""
    if label == Classification.UNKNOWN:
        return -1
    ranks = split_label(label)[1:6]
    depth = 0
    for i, rank in enumerate(ranks):
        if rank:
            depth = i + 1
    if depth == 0 and label != Classification.ANIMAL:
        return -1
    return depth


@lru_cache(maxsize=65536)
def needs_embedding(label: str) -> bool:
    """Labels stages 1-5 work on: animals (as references or coarse candidates) and blanks; never people."""
    return label == Classification.BLANK or (label_depth(label) >= 0 and label != Classification.HUMAN)


def _ranks(label: str) -> list[str]:
    return split_label(label)[1:6]


@lru_cache(maxsize=262144)
def is_descendant(label: str, ancestor: str) -> bool:
    """True when `label` sits strictly below `ancestor` (blank and animal count as the root)."""
    depth = label_depth(ancestor)
    if ancestor == Classification.BLANK:
        depth = 0
    if depth < 0 or label_depth(label) <= depth:
        return False
    return _ranks(label)[:depth] == _ranks(ancestor)[:depth]


def accept(labels: Sequence[str], scores: np.ndarray, sources: Sequence[str], config: StageConfig) -> np.ndarray:
    """Stage 1: mask of confident species-level classifier labels (the references)."""
    return np.array(
        [label_depth(lab) == 5 and s >= config.tau_accept and src in config.accept_sources
         for lab, s, src in zip(labels, scores, sources)],
        dtype=bool,
    )


def aves_mass(top_classes: Sequence[Sequence[str]], top_scores: Sequence[Sequence[float]]) -> np.ndarray:
    """SpeciesNet's summed score of labels in class aves, per detection (from its top-5)."""
    return np.array(
        [sum(s for c, s in zip(classes, scores) if _ranks(c)[0] == "aves")
         for classes, scores in zip(top_classes, top_scores)],
        dtype=np.float64,
    )


def bird_probability(embeddings: np.ndarray, prompts: np.ndarray, bird_rows: Sequence[int],
                     temperature: float = 100.0) -> np.ndarray:
    """CLIP zero-shot: softmax over prompt similarities, summed over the bird prompts."""
    logits = temperature * (embeddings @ prompts.T)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs[:, list(bird_rows)].sum(axis=1)


def birds(labels: Sequence[str], det_conf: np.ndarray, aves: np.ndarray, prompt_prob: Optional[np.ndarray],
          config: StageConfig) -> np.ndarray:
    """Stage 2: mask of blank or animal detections whose bird evidence passes its threshold."""
    coarse = np.array([lab in (Classification.BLANK, Classification.ANIMAL) for lab in labels], dtype=bool)
    evidence = aves >= config.bird_aves_mass
    if prompt_prob is not None:
        evidence |= prompt_prob >= config.bird_prompt
    return coarse & evidence & (det_conf >= config.bird_min_conf)


@dataclass
class Centroids:
    """Stage 3: one L2-normalised centroid per label and ancestor, with its reference-distance spread."""

    labels: list[str]
    levels: list[str]
    vectors: np.ndarray
    counts: np.ndarray
    mean_distance: np.ndarray
    std_distance: np.ndarray
    whitening: Optional[np.ndarray] = None
    inv_var: Optional[np.ndarray] = None
    mahalanobis_mean: Optional[np.ndarray] = None
    mahalanobis_std: Optional[np.ndarray] = None
    references: Optional[np.ndarray] = None
    reference_labels: Optional[list[str]] = None
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {label: i for i, label in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path) -> None:
        """Writes an .npz loadable with allow_pickle=False."""
        arrays = dict(labels=np.array(self.labels, dtype=str), levels=np.array(self.levels, dtype=str),
                      vectors=self.vectors.astype(np.float32), counts=self.counts.astype(np.int64),
                      mean_distance=self.mean_distance, std_distance=self.std_distance)
        if self.references is not None:
            arrays.update(references=self.references.astype(np.float32),
                          reference_labels=np.array(self.reference_labels, dtype=str))
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path) -> Centroids:
        """Reads a centroid file written by `save` (never unpickles)."""
        with np.load(path, allow_pickle=False) as data:
            has_refs = "references" in data.files
            return cls([str(x) for x in data["labels"]], [str(x) for x in data["levels"]], data["vectors"],
                       data["counts"], data["mean_distance"], data["std_distance"],
                       references=data["references"] if has_refs else None,
                       reference_labels=[str(x) for x in data["reference_labels"]] if has_refs else None)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length (zero rows stay zero), in the input's dtype."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _lineage(label: str, taxonomy_map: dict) -> list[tuple[str, str]]:
    """(level, label) for the label itself and each ancestor the taxonomy knows, species first."""
    out = []
    for level in ("species", "genus", "family", "order", "class"):
        ancestor = get_ancestor_at_level(label, level, taxonomy_map)
        if ancestor:
            out.append((level, ancestor))
    if not out or out[0][1] != label:
        depth = label_depth(label)
        if depth > 0:
            out.insert(0, (LEVELS[5 - depth], label))
    return out


def build_centroids(embeddings: np.ndarray, labels: Sequence[str], taxonomy_map: dict,
                    config: StageConfig) -> Centroids:
    """Stage 3: centroids for every label with >= n_min references; ancestors pool their descendants.

    Vectorised per level: each reference belongs to at most one node per level, so a level's member sums
    are a sorted segment sum and each reference's distance to its node's centroid one row-wise product.
    """
    vectors = unit_rows(np.asarray(embeddings, dtype=np.float64))
    labels = list(labels)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    unique = sorted(set(labels))
    label_row = {lab: i for i, lab in enumerate(unique)}
    row_label = np.array([label_row[lab] for lab in labels], dtype=np.int64)
    nodes: dict[str, int] = {}
    level_of: dict[str, str] = {}
    per_level: dict[str, np.ndarray] = {}
    for level in ("species", "genus", "family", "order", "class", "kingdom"):
        per_level[level] = np.full(len(unique), -1, dtype=np.int64)
    for i, label in enumerate(unique):
        for level, node in _lineage(label, taxonomy_map):
            nodes.setdefault(node, len(nodes))
            level_of[node] = level
            per_level[level][i] = nodes[node]
    names = list(nodes)
    label_sums = np.zeros((len(unique), dim))
    label_counts = np.bincount(row_label, minlength=len(unique)) if len(labels) else np.zeros(0, dtype=np.int64)
    if len(labels):
        order = np.argsort(row_label, kind="stable")
        present, starts = np.unique(row_label[order], return_index=True)
        label_sums[present] = np.add.reduceat(vectors[order], starts, axis=0)
    sums = np.zeros((len(names), dim))
    counts_all = np.zeros(len(names), dtype=np.int64)
    for of_label in per_level.values():
        valid = np.flatnonzero(of_label >= 0)
        np.add.at(sums, of_label[valid], label_sums[valid])
        np.add.at(counts_all, of_label[valid], label_counts[valid])
    keep_ids = np.array(sorted((k for k in range(len(names)) if counts_all[k] >= config.n_min),
                               key=lambda k: names[k]), dtype=np.int64)
    keep = [names[k] for k in keep_ids]
    cents = unit_rows(sums[keep_ids]) if keep_ids.size else np.zeros((0, dim))
    position = np.full(len(names) + 1, -1, dtype=np.int64)
    position[keep_ids] = np.arange(keep_ids.size)
    total = np.zeros(len(keep))
    total_sq = np.zeros(len(keep))
    x32 = vectors.astype(np.float32)
    c32 = np.vstack([cents, np.zeros((1, dim))]).astype(np.float32)  # last row: "no centroid"
    for of_label in per_level.values():
        pos = position[of_label][row_label] if len(labels) else np.zeros(0, dtype=np.int64)
        live = pos >= 0
        if not live.any():
            continue
        d = 1.0 - np.einsum("ij,ij->i", x32, c32[pos]).astype(np.float64)
        total += np.bincount(pos[live], weights=d[live], minlength=len(keep))
        total_sq += np.bincount(pos[live], weights=d[live] ** 2, minlength=len(keep))
    counts = counts_all[keep_ids]
    mean_d = total / np.maximum(counts, 1)
    std_d = np.sqrt(np.maximum(total_sq / np.maximum(counts, 1) - mean_d ** 2, 0.0))
    result = Centroids(keep, [level_of[n] for n in keep], cents, counts, mean_d, std_d,
                       references=vectors.astype(np.float32), reference_labels=labels)
    if config.scoring == "mahalanobis" and keep:
        members: dict[str, list[int]] = {}
        for of_label in per_level.values():
            node_of_row = of_label[row_label]
            for i, k in enumerate(node_of_row.tolist()):
                if k >= 0:
                    members.setdefault(names[k], []).append(i)
        _fit_mahalanobis(result, vectors, members, config)
    return result


def _fit_mahalanobis(cents: Centroids, vectors: np.ndarray, members: dict[str, list[int]],
                     config: StageConfig) -> None:
    """One pooled within-class whitening plus a per-class diagonal in whitened space, shrunk towards the pool.

    Memory is dim x dim once plus dim per centroid (2,500 centroids x 1,280 dims: ~40 MB), never a
    dim x dim matrix per centroid.
    """
    dim = vectors.shape[1]
    pooled = np.zeros((dim, dim))
    total = 0
    for node in cents.labels:
        rows = vectors[members[node]] - cents.vectors[cents.index[node]]
        pooled += rows.T @ rows
        total += len(rows)
    pooled = pooled / max(total, 1) + 1e-4 * np.eye(dim)
    values, vecs = np.linalg.eigh(pooled)
    whitening = (vecs / np.sqrt(np.maximum(values, 1e-9))).T
    inv_var = np.zeros((len(cents), dim))
    means, stds = [], []
    for k, node in enumerate(cents.labels):
        rows = (vectors[members[node]] - cents.vectors[k]) @ whitening.T
        own = (rows ** 2).mean(axis=0)
        inv_var[k] = 1.0 / ((1 - config.shrinkage) * own + config.shrinkage + 1e-6)
        d = (rows ** 2 * inv_var[k]).sum(axis=1) / dim
        means.append(d.mean())
        stds.append(d.std())
    cents.whitening = whitening
    cents.inv_var = inv_var
    cents.mahalanobis_mean = np.array(means)
    cents.mahalanobis_std = np.array(stds)


@dataclass(frozen=True)
class Decision:
    """What stage 5 (or 2) did to one detection, for the `reclassification` output object."""

    label: str
    level: str
    stage: str
    distance: float
    threshold: float
    runner_up: Optional[str]
    margin: Optional[float]
    original: str
    scoring: str

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def distance_matrix(x: np.ndarray, cents: Centroids, rows: np.ndarray, config: StageConfig) -> np.ndarray:
    """(queries x centroids[rows]) distances: cosine, or Mahalanobis per dimension, as matrix products."""
    if config.scoring == "cosine":
        return 1.0 - x.astype(np.float32) @ cents.vectors[rows].T.astype(np.float32)
    z = x @ cents.whitening.T
    m = cents.vectors[rows] @ cents.whitening.T
    iv = cents.inv_var[rows]
    d = (z ** 2) @ iv.T - 2.0 * z @ (m * iv).T + ((m ** 2) * iv).sum(axis=1)[None, :]
    return np.maximum(d, 0.0) / x.shape[1]


def _thresholds(cents: Centroids, rows: np.ndarray, config: StageConfig) -> np.ndarray:
    if config.scoring == "cosine":
        return np.clip(cents.mean_distance[rows] + config.lam * cents.std_distance[rows], config.t_min, config.t_max)
    return np.clip(cents.mahalanobis_mean[rows] + config.lam * cents.mahalanobis_std[rows], 0.0,
                   config.mahalanobis_t_max)


def score(embeddings: np.ndarray, labels: Sequence[str], det_conf: np.ndarray, cents: Centroids,
          allowed: Callable[[str], bool], config: StageConfig,
          thresholds: Optional[dict[str, float]] = None, chunk: int = 8192) -> list[Optional[Decision]]:
    """Stage 5: rolls each coarse detection down to the nearest allowed descendant centroid that passes.

    Levels are tried most specific first; a level passes when its nearest centroid is within that
    centroid's adaptive threshold and beats the level's runner-up by the margin. Never less specific than
    the original label, never a geofence-blocked taxon, never a blank below the detector floor. `thresholds`
    (label -> distance) overrides the adaptive ones. Vectorised: one distance matrix per original label,
    level and chunk of detections.
    """
    x_all = unit_rows(np.asarray(embeddings, dtype=np.float64))
    labels = list(labels)
    det_conf = np.asarray(det_conf, dtype=np.float64)
    decisions: list[Optional[Decision]] = [None] * len(labels)
    if not len(cents) or not labels:
        return decisions
    levels = np.array(cents.levels)
    permitted = np.array([allowed(label) for label in cents.labels], dtype=bool)
    adaptive = _thresholds(cents, np.arange(len(cents)), config)
    if thresholds:
        adaptive = np.array([thresholds.get(lab, t) for lab, t in zip(cents.labels, adaptive)])
    ranks = np.array([_ranks(lab) for lab in cents.labels], dtype=object).reshape(len(cents), 5)
    depths = np.array([label_depth(lab) for lab in cents.labels], dtype=np.int64)
    groups: dict[str, list[int]] = {}
    for i, original in enumerate(labels):
        if original == Classification.BLANK and det_conf[i] < config.blank_floor:
            continue
        groups.setdefault(original, []).append(i)
    for original, members in groups.items():
        depth = 0 if original == Classification.BLANK else label_depth(original)
        if depth < 0:
            continue
        mask = (depths > depth) & permitted
        if depth > 0:
            mask &= (ranks[:, :depth] == np.array(_ranks(original)[:depth], dtype=object)).all(axis=1)
        todo = np.asarray(members, dtype=np.int64)
        for level in config.levels:
            rows = np.flatnonzero(mask & (levels == level))
            if rows.size == 0 or todo.size == 0:
                continue
            passed = np.zeros(todo.size, dtype=bool)
            for start in range(0, todo.size, chunk):
                part = todo[start : start + chunk]
                d = distance_matrix(x_all[part], cents, rows, config)
                r = np.arange(part.size)
                first = np.argmin(d, axis=1)  # the first minimum: ties go to the earlier centroid, as a stable sort
                order = np.stack([first, first], axis=1)
                if rows.size > 1:
                    d_first = d[r, first].copy()
                    d[r, first] = np.inf
                    order[:, 1] = np.argmin(d, axis=1)
                    d[r, first] = d_first
                best = d[r, order[:, 0]]
                second = d[r, order[:, 1]] if rows.size > 1 else np.full(part.size, np.inf)
                gap = second - best
                winner = rows[order[:, 0]]
                ok = (best <= adaptive[winner]) & ((rows.size == 1) | (gap >= config.margin))
                for j in np.flatnonzero(ok):
                    runner = rows[order[j, 1]] if rows.size > 1 else None
                    decisions[part[j]] = Decision(
                        cents.labels[winner[j]], level, "score", float(best[j]), float(adaptive[winner[j]]),
                        cents.labels[runner] if runner is not None else None,
                        float(gap[j]) if runner is not None else None, original, config.scoring)
                passed[start : start + part.size] = ok
            todo = todo[~passed]
    return decisions
