"""Pass 2 as one function over stored arrays: stages 1-5, with every re-label decided by calibrated evidence.

`pass_two` takes what pass 1 stored (predictions, the embedding table, the evidence table of SpeciesNet's
top-5 and crop quality, the degraded reference views) plus events, taxonomy, geofence and a config, and
returns the decisions with their evidence. The CLI, `reclassify`, the benchmarks and evaluation all call it.

Decision modes (`StageConfig.decision`):
- "calibrated" (default): a coarse detection is re-labelled only when a logistic model over its evidence
  (the burst's references, the embedding's nearest centroid and margin, SpeciesNet's own top-5 mass on the
  proposal, crop quality) passes a per-level threshold chosen so that the Clopper-Pearson lower bound of
  precision on held-out degraded references reaches the target. A level that cannot reach it is off.
- "adaptive": the paper's stage 5 (nearest descendant centroid within mean + lam * std, margin), as before.
- "nearest": nearest allowed descendant centroid, no threshold (a baseline).
- "smoothing": MegaDetector-style: coarse detections take their event's dominant confident species.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..card.bursts import dominant_labels, pool_by_event
from ..speciesnet.ensemble import Classification
from .calibrated import decide
from .evidence import Queries
from .stages import (
    StageConfig, accept, aves_mass, bird_probability, birds, build_centroids, is_descendant, label_depth,
    needs_embedding, score, unit_rows,
)

__all__ = ["DegradedTable", "EmbeddingTable", "EvidenceTable", "PassTwoInputs", "PassTwoResult", "pass_two"]



@dataclass
class EmbeddingTable:
    """Backbone embeddings of the detections that need them, keyed by (filepath, detection index)."""

    filepaths: list[str]
    detections: np.ndarray
    vectors: np.ndarray
    backbone: str = "speciesnet"


@dataclass
class EvidenceTable:
    """Per detection, what pass 1 saw beyond the prediction: SpeciesNet's top-5 and the crop's quality.

    `quality` rows are (box side in source pixels, brightness 0..1, colourfulness 0..1), see `crop_quality`.
    """

    filepaths: list[str]
    detections: np.ndarray
    top_classes: list[list[str]]
    top_scores: list[list[float]]
    quality: np.ndarray


@dataclass
class DegradedTable:
    """Degraded views of a bounded sample of references (and background patches), rendered in pass 1.

    `labels` is the source reference's label (the truth calibration scores against), or "blank" for a
    background patch; `filepaths`/`detections` name the source reference; `vectors` are embeddings from the
    same backbone as the embedding table; `top_classes`/`top_scores` the classifier's top-5 on the view.
    """

    filepaths: list[str]
    detections: np.ndarray
    labels: list[str]
    kinds: list[str]
    vectors: np.ndarray
    top_classes: list[list[str]]
    top_scores: list[list[float]]
    quality: np.ndarray


@dataclass
class PassTwoInputs:
    """Everything pass 2 reads: pass 1's predictions and tables, and the events (filepath -> event id)."""

    predictions: list[dict]
    embeddings: EmbeddingTable
    evidence: Optional[EvidenceTable] = None
    degraded: Optional[DegradedTable] = None
    events: dict[str, str] = field(default_factory=dict)


@dataclass
class PassTwoResult:
    """Decisions keyed by (filepath, detection index), counts per stage, and the calibration report."""

    decisions: dict[tuple[str, int], dict]
    counts: dict[str, int]
    calibration: dict
    notes: list[str]

    def apply(self, predictions: list[dict]) -> None:
        """Sets (or clears) each detection's `reclassification` object from these decisions."""
        for pred in predictions:
            for idx, det in enumerate(pred.get("detections") or []):
                det.pop("reclassification", None)
                decision = self.decisions.get((pred["filepath"], idx))
                if decision is not None:
                    det["reclassification"] = decision


def pass_two(inputs: PassTwoInputs, taxonomy_map: dict, allowed: Callable[[str], bool], config: StageConfig, *,
             head: Optional[Callable[[np.ndarray], np.ndarray]] = None, prompts: Optional[np.ndarray] = None,
             bird_rows: Sequence[int] = (), shipped: Optional[tuple[np.ndarray, list[str]]] = None,
             card_references: bool = True, event_pooling: bool = False, seed: int = 0,
             timer=None) -> PassTwoResult:
    """Stages 1-5 over one card's stored arrays; returns decisions with their evidence, nothing mutated.

    `head` is stage 4 (maps raw embeddings to normalised head space); `shipped` adds a bundle's reference
    embeddings (already in head space, as `trapedge fit` stores them) and labels to the centroids
    (`card_references=False` uses only those). `timer` (a `StageTimer`) times accept, centroids,
    calibrate and score.
    """
    stage = timer.stage if timer is not None else (lambda name: nullcontext())
    rows = {(fp, int(d)): i for i, (fp, d) in enumerate(zip(inputs.embeddings.filepaths,
                                                             inputs.embeddings.detections))}
    evidence_rows = {}
    if inputs.evidence is not None:
        evidence_rows = {(fp, int(d)): i for i, (fp, d) in enumerate(zip(inputs.evidence.filepaths,
                                                                          inputs.evidence.detections))}
    keys, dets, vec_rows = [], [], []
    for pred in inputs.predictions:
        for idx, det in enumerate(pred.get("detections") or []):
            processed = det.get("processed_classification")
            key = (pred["filepath"], idx)
            if processed and needs_embedding(processed["class"]) and key in rows:
                keys.append(key)
                dets.append(det)
                vec_rows.append(rows[key])
    counts = {"accept": 0, "birds": 0, "score": 0, "smoothing": 0, "candidates": 0}
    result = PassTwoResult({}, counts, {"decision": config.decision}, [])
    if not dets:
        return result
    project = (lambda v: _normalise(head(v))) if head is not None else _normalise
    raw = inputs.embeddings.vectors[np.asarray(vec_rows)]
    projected = project(raw)
    labels = [d["processed_classification"]["class"] for d in dets]
    scores = np.array([d["processed_classification"]["score"] for d in dets], dtype=np.float64)
    sources = [d["processed_classification"]["source"] for d in dets]
    conf = np.array([d["conf"] for d in dets], dtype=np.float64)
    events = [inputs.events.get(fp, fp) for fp, _ in keys]
    ev_rows = np.array([evidence_rows.get(key, -1) for key in keys], dtype=np.int64)
    quality = np.full((len(dets), 3), np.nan)
    if inputs.evidence is not None and (ev_rows >= 0).any():
        quality[ev_rows >= 0] = np.asarray(inputs.evidence.quality)[ev_rows[ev_rows >= 0]]
    top_classes, top_scores = [], []
    for row, det in zip(ev_rows.tolist(), dets):
        if row >= 0:
            top_classes.append(inputs.evidence.top_classes[row])
            top_scores.append(inputs.evidence.top_scores[row])
        else:
            raw_cls = det.get("raw_classifications") or {}
            top_classes.append(raw_cls.get("classes", []))
            top_scores.append(raw_cls.get("scores", []))

    with stage("accept"):
        refs = accept(labels, scores, sources, config)
    for i in np.flatnonzero(refs):
        result.decisions[keys[i]] = {"class": labels[i], "level": "species", "stage": "accept",
                                     "score": float(scores[i]), "threshold": config.tau_accept,
                                     "original": labels[i]}
    counts["accept"] = int(refs.sum())
    ref_idx = np.flatnonzero(refs)
    ref_labels = [labels[i] for i in ref_idx]
    ref_vectors = projected[ref_idx]
    if shipped is not None:
        ship_vecs = _normalise(np.asarray(shipped[0], dtype=np.float32))  # stored in head space by `trapedge fit`
        cent_vectors = np.concatenate([ship_vecs, ref_vectors]) if card_references else ship_vecs
        cent_labels = list(shipped[1]) + ref_labels if card_references else list(shipped[1])
    else:
        cent_vectors, cent_labels = ref_vectors, ref_labels
    with stage("centroids"):
        cents = build_centroids(cent_vectors, cent_labels, taxonomy_map, config)

    prompt_prob = np.zeros(len(dets))
    if prompts is not None and len(bird_rows):
        prompt_prob = bird_probability(_normalise(raw), prompts, bird_rows)
    candidates = np.array([not refs[i] and (label_depth(lab) < 5 or lab == Classification.BLANK)
                           and not (lab == Classification.BLANK and conf[i] < config.blank_floor)
                           for i, lab in enumerate(labels)], dtype=bool)
    counts["candidates"] = int(candidates.sum())

    if event_pooling and config.decision not in ("adaptive", "nearest"):
        raise ValueError("event pooling applies to --decision adaptive or nearest only")
    if config.decision == "calibrated":
        member_of_ref = np.arange(len(ref_idx)) + (len(cent_labels) - len(ref_labels)) if card_references \
            else np.full(len(ref_idx), -1, dtype=np.int64)
        cand = np.flatnonzero(candidates)
        queries = Queries(
            vectors=projected[cand], coarse=[labels[i] for i in cand], events=[events[i] for i in cand],
            top_classes=[top_classes[i] for i in cand], top_scores=[top_scores[i] for i in cand],
            quality=quality[cand], bird_prompt=prompt_prob[cand],
            source_ref=np.full(cand.size, -1, dtype=np.int64), hidden_label=[None] * cand.size)
        prompt_of = (lambda v: bird_probability(_normalise(v), prompts, bird_rows)) \
            if prompts is not None and len(bird_rows) else (lambda v: np.zeros(len(v)))
        ref_queries = Queries(
            vectors=projected[ref_idx], coarse=[labels[i] for i in ref_idx], events=[events[i] for i in ref_idx],
            top_classes=[top_classes[i] for i in ref_idx], top_scores=[top_scores[i] for i in ref_idx],
            quality=quality[ref_idx], bird_prompt=prompt_prob[ref_idx],
            source_ref=np.arange(ref_idx.size), hidden_label=[labels[i] for i in ref_idx])
        decisions, calibration, notes = decide(
            queries, [keys[i] for i in cand], [labels[i] for i in cand], [keys[i] for i in ref_idx],
            scores[ref_idx], ref_queries, cents, cent_vectors, cent_labels, member_of_ref,
            inputs.degraded, taxonomy_map, allowed, config, project, prompt_of, seed, stage)
        result.decisions.update(decisions)
        result.calibration.update(calibration)
        result.notes.extend(notes)
        counts["score"] = len(decisions)
        counts["birds"] = sum(d.get("via") == "birds" for d in decisions.values())
        return result
    working = list(labels)
    aves = aves_mass(top_classes, top_scores)
    bird_label = taxonomy_map.get("aves;;;;")
    prompt_arg = prompt_prob if prompts is not None and len(bird_rows) else None
    bird_mask = birds(labels, conf, aves, prompt_arg, config) if bird_label and config.decision != "smoothing" \
        else np.zeros(len(dets), dtype=bool)
    for i in np.flatnonzero(bird_mask):
        working[i] = bird_label
        result.decisions[keys[i]] = {
            "class": bird_label, "level": "class", "stage": "birds", "original": labels[i],
            "aves_score": float(aves[i]), "aves_threshold": config.bird_aves_mass,
            "bird_prompt": None if prompt_arg is None else float(prompt_prob[i]),
            "bird_prompt_threshold": None if prompt_arg is None else config.bird_prompt}
    counts["birds"] = int(bird_mask.sum())
    if config.decision == "smoothing":
        counts["smoothing"] = _smooth(result, keys, dets, labels, working, refs, events, allowed, config)
        return result
    idx = np.flatnonzero(np.array([(label_depth(w) < 5 or w == Classification.BLANK) and not refs[i]
                                   for i, w in enumerate(working)], dtype=bool))
    queries = projected[idx]
    if event_pooling and idx.size:
        queries = pool_by_event(queries, [f"{events[i]}|{working[i]}" for i in idx])
    run_config = config
    if config.decision == "nearest":
        run_config = StageConfig.from_dict({**config.to_dict(), "lam": 1e6, "t_max": 2.0, "margin": 0.0,
                                            "mahalanobis_t_max": 1e12})
    with stage("score"):
        decisions = score(queries, [working[i] for i in idx], conf[idx], cents, allowed, run_config) \
            if len(cents) and idx.size else []
    for i, decision in zip(idx, decisions):
        if decision is None:
            continue
        out = decision.to_dict()
        out["class"] = out.pop("label")
        out["original"] = labels[i]
        if bird_mask[i]:
            out["via"] = "birds"
        result.decisions[keys[i]] = out
        counts["score"] += 1
    return result


def _smooth(result: PassTwoResult, keys: list, dets: list[dict], labels: list[str], working: list[str],
            refs: np.ndarray, events: list[str], allowed: Callable[[str], bool], config: StageConfig) -> int:
    """MegaDetector-style smoothing: coarse detections take their event's dominant confident species."""
    species = [labels[i] if refs[i] else None for i in range(len(labels))]
    dominant = dominant_labels(species, events)
    changed = 0
    for i, det in enumerate(dets):
        if refs[i]:
            continue
        label = dominant.get(events[i])
        if label and allowed(label) and is_descendant(label, working[i]) and (
                working[i] != Classification.BLANK or det["conf"] >= config.blank_floor):
            result.decisions[keys[i]] = {"class": label, "level": "species", "stage": "smoothing",
                                         "event": events[i], "original": labels[i]}
            changed += 1
    return changed


def _normalise(x: np.ndarray) -> np.ndarray:
    """float32 unit rows: pass 2 keeps its large matrices in single precision."""
    return unit_rows(np.asarray(x, dtype=np.float32))
