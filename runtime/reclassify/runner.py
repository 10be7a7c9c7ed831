"""Pass 2 over a whole dump: stages 1 (accept), 2 (birds), 3 (centroids), 4 (head) and 5 (score)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .bench import StageTimer
from .bundle import Bundle
from .bursts import dominant_labels, pool_by_event
from .ensemble import Classification, load_geofence, load_taxonomy, should_geofence_animal_classification
from .stages import (
    Centroids, StageConfig, accept, aves_mass, bird_probability, birds, build_centroids, is_descendant,
    label_depth, needs_embedding, score,
)

__all__ = ["CENTROID_SOURCES", "EmbeddingTable", "Reclassifier", "calibrate_thresholds"]

CENTROID_SOURCES = ("bundle", "dump", "both")
_LEVEL_NAMES = {0: "kingdom", 1: "class", 2: "order", 3: "family", 4: "genus", 5: "species"}


@dataclass
class EmbeddingTable:
    """Backbone embeddings of the detections that need them, keyed by (filepath, detection index)."""

    filepaths: list[str]
    detections: np.ndarray
    vectors: np.ndarray
    backbone: str = "speciesnet"


def calibrate_thresholds(vectors: np.ndarray, labels: Sequence[str], taxonomy_map: dict, config: StageConfig,
                         target_precision: float, seed: int = 0, holdout: float = 0.25) -> dict[str, float]:
    """Per-level distance thresholds reaching a target precision on held-out references.

    References are split (seeded); centroids come from one part; each held-out reference is scored as if
    SpeciesNet had only said "animal"; at each level the largest threshold whose accepted assignments are
    right at least `target_precision` of the time is kept.
    """
    rng = np.random.default_rng(seed)
    labels = list(labels)
    order = rng.permutation(len(labels))
    n_hold = max(1, int(len(labels) * holdout))
    held, fit = order[:n_hold], order[n_hold:]
    cents = build_centroids(vectors[fit], [labels[i] for i in fit], taxonomy_map, config)
    result: dict[str, float] = {}
    if not len(cents):
        return result
    open_config = StageConfig.from_dict({**config.to_dict(), "margin": 0.0, "t_min": 0.0, "t_max": 2.0,
                                         "mahalanobis_t_max": 1e9, "lam": 1e6})
    for level in config.levels:
        one = StageConfig.from_dict({**open_config.to_dict(), "levels": [level]})
        decisions = score(vectors[held], [Classification.ANIMAL.value] * len(held), np.ones(len(held)), cents,
                          lambda _: True, one)
        pairs = []
        for i, d in zip(held, decisions):
            if d is not None:
                truth = labels[i].split(";")[1:6]
                got = d.label.split(";")[1:6]
                depth = label_depth(d.label)
                pairs.append((d.distance, truth[:depth] == got[:depth]))
        if not pairs:
            continue
        pairs.sort()
        correct = np.cumsum([ok for _, ok in pairs])
        precision = correct / np.arange(1, len(pairs) + 1)
        good = np.flatnonzero(precision >= target_precision)
        if good.size:
            result[level] = float(pairs[good[-1]][0])
    return result


class Reclassifier:
    """Runs stages 1-5 over a finished pass 1 and adds `reclassification` objects to the predictions."""

    def __init__(self, bundle: Bundle, config: StageConfig = StageConfig(), *, centroids: str = "dump",
                 country: Optional[str] = None, admin1_region: Optional[str] = None, enable_geofence: bool = True,
                 target_precision: Optional[float] = None, device: str = "cpu",
                 events: Optional[dict[str, str]] = None, smoothing: bool = False,
                 event_pooling: bool = False) -> None:
        if centroids not in CENTROID_SOURCES:
            raise ValueError(f"--centroids must be one of {', '.join(CENTROID_SOURCES)}, got {centroids!r}")
        if centroids != "dump" and "centroids" not in bundle.manifest["files"]:
            raise ValueError(f"{bundle.root}: --centroids {centroids} needs a bundle with a centroid file "
                             "(trapedge fit)")
        from .embed import head_backend, load_prompts

        self.bundle = bundle
        self.config = config
        self.centroid_source = centroids
        self.country, self.admin1_region, self.enable_geofence = country, admin1_region, enable_geofence
        self.target_precision = target_precision
        self.taxonomy_map = load_taxonomy(bundle.file("taxonomy"))
        self.geofence_map = load_geofence(bundle.file("geofence"))
        self.head = head_backend(bundle, device)
        self.prompts, self.bird_rows = load_prompts(bundle)
        self.timer = StageTimer()
        self.summary: dict[str, int] = {}
        self.events = events or {}
        self.smoothing = smoothing
        self.event_pooling = event_pooling

    def allowed(self, label: str) -> bool:
        """True when the geofence allows this taxon here."""
        return not should_geofence_animal_classification(label, self.country, self.admin1_region,
                                                         self.geofence_map, self.enable_geofence)

    def run(self, predictions: list[dict], table: EmbeddingTable) -> dict[str, int]:
        """Adds `reclassification` to every detection a stage touched; returns counts per stage."""
        from .embed import apply_head

        rows = {(fp, int(d)): i for i, (fp, d) in enumerate(zip(table.filepaths, table.detections))}
        dets, vec_rows, event_of = [], [], []
        for pred in predictions:
            for idx, det in enumerate(pred.get("detections") or []):
                det.pop("reclassification", None)
                processed = det.get("processed_classification")
                key = (pred["filepath"], idx)
                if processed and needs_embedding(processed["class"]) and key in rows:
                    dets.append(det)
                    vec_rows.append(rows[key])
                    event_of.append(self.events.get(pred["filepath"], pred["filepath"]))
        counts = {"accept": 0, "birds": 0, "score": 0, "smoothing": 0, "candidates": 0}
        if not dets:
            self.summary = counts
            return counts
        raw = table.vectors[np.asarray(vec_rows)]
        with self.timer.stage("head"):
            projected = apply_head(raw, self.head)
        labels = [d["processed_classification"]["class"] for d in dets]
        scores = np.array([d["processed_classification"]["score"] for d in dets])
        sources = [d["processed_classification"]["source"] for d in dets]
        conf = np.array([d["conf"] for d in dets])

        with self.timer.stage("accept"):
            refs = accept(labels, scores, sources, self.config)
        for i in np.flatnonzero(refs):
            dets[i]["reclassification"] = {"class": labels[i], "level": "species", "stage": "accept",
                                           "score": float(scores[i]), "threshold": self.config.tau_accept,
                                           "original": labels[i]}
        counts["accept"] = int(refs.sum())

        with self.timer.stage("birds"):
            bird_label = self.taxonomy_map.get("aves;;;;")
            top = [d.get("raw_classifications", {}) for d in dets]
            aves = aves_mass([t.get("classes", []) for t in top], [t.get("scores", []) for t in top])
            prompt_prob = None
            if self.prompts is not None and self.bundle.manifest.get("embedding", {}).get("model") != "classifier":
                prompt_prob = bird_probability(_normalise(raw), self.prompts, self.bird_rows)
            bird_mask = birds(labels, conf, aves, prompt_prob, self.config) if bird_label else np.zeros(len(dets), bool)
        working = list(labels)
        for i in np.flatnonzero(bird_mask):
            working[i] = bird_label
            dets[i]["reclassification"] = {
                "class": bird_label, "level": "class", "stage": "birds", "original": labels[i],
                "aves_score": float(aves[i]), "aves_threshold": self.config.bird_aves_mass,
                "bird_prompt": None if prompt_prob is None else float(prompt_prob[i]),
                "bird_prompt_threshold": None if prompt_prob is None else self.config.bird_prompt}
        counts["birds"] = int(bird_mask.sum())

        with self.timer.stage("centroids"):
            cents = self._centroids(projected[refs], [labels[i] for i in np.flatnonzero(refs)])
            thresholds = None
            if self.target_precision is not None and refs.sum() >= 2 * self.config.n_min:
                per_level = calibrate_thresholds(projected[refs], [labels[i] for i in np.flatnonzero(refs)],
                                                 self.taxonomy_map, self.config, self.target_precision)
                thresholds = {lab: per_level.get(lev, -1.0) for lab, lev in zip(cents.labels, cents.levels)}
        candidates = np.array([(label_depth(w) < 5 or w == Classification.BLANK) and not refs[i]
                               for i, w in enumerate(working)], dtype=bool)
        counts["candidates"] = int(candidates.sum())
        with self.timer.stage("score"):
            idx = np.flatnonzero(candidates)
            queries = projected[idx]
            if self.event_pooling and idx.size:
                queries = pool_by_event(queries, [f"{event_of[i]}|{working[i]}" for i in idx])
            decisions = score(queries, [working[i] for i in idx], conf[idx], cents, self.allowed,
                              self.config, thresholds) if len(cents) and idx.size else []
        for i, decision in zip(idx, decisions):
            if decision is None:
                continue
            out = decision.to_dict()
            out["class"] = out.pop("label")
            out["original"] = labels[i]
            if bird_mask[i]:
                out["via"] = "birds"
            dets[i]["reclassification"] = out
            counts["score"] += 1
        if self.smoothing:
            counts["smoothing"] = self._smooth(dets, labels, working, refs, event_of)
        self.summary = counts
        return counts

    def _smooth(self, dets: list[dict], labels: list[str], working: list[str], refs: np.ndarray,
                event_of: list[str]) -> int:
        """MegaDetector-style smoothing: coarse detections left untouched take their event's dominant species."""
        final = [d.get("reclassification", {}).get("class") if refs[i] or (d.get("reclassification") or {}).get(
            "stage") == "score" else None for i, d in enumerate(dets)]
        species = [f if f and label_depth(f) == 5 else None for f in final]
        dominant = dominant_labels(species, event_of)
        changed = 0
        for i, det in enumerate(dets):
            rec = det.get("reclassification")
            if rec and rec["stage"] in ("accept", "score"):
                continue
            label = dominant.get(event_of[i])
            if label and self.allowed(label) and is_descendant(label, working[i]) and (
                    working[i] != Classification.BLANK or det["conf"] >= self.config.blank_floor):
                det["reclassification"] = {"class": label, "level": "species", "stage": "smoothing",
                                           "event": event_of[i], "original": labels[i]}
                changed += 1
        return changed

    def _centroids(self, vectors: np.ndarray, labels: list[str]) -> Centroids:
        """Centroids from the dump's references, the bundle's shipped references, or both pooled."""
        if self.centroid_source == "dump":
            return build_centroids(vectors, labels, self.taxonomy_map, self.config)
        shipped = Centroids.load(self.bundle.file("centroids"))
        if shipped.references is None:
            if self.centroid_source == "both" or self.config.scoring != "cosine":
                raise ValueError(f"{self.bundle.file('centroids')}: holds no references, so it can only be used "
                                 "as is (--centroids bundle --scoring cosine)")
            return shipped
        if self.centroid_source == "bundle":
            return build_centroids(shipped.references, shipped.reference_labels, self.taxonomy_map, self.config)
        return build_centroids(np.concatenate([shipped.references, vectors.astype(np.float32)]),
                               list(shipped.reference_labels) + list(labels), self.taxonomy_map, self.config)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
