"""Calibrated decisions: fit the evidence model on held-out degraded references, certify each level, decide.

Calibration queries are the degraded views pass 1 rendered of a sample of the card's references (scored
as if SpeciesNet had said only "animal"), the same views again with their species held out of centroids
and bursts (as an unknown species would be), and background patches (any label is wrong). A logistic
model over the evidence is cross-fitted by reference; per level, most specific first, the acceptance
threshold is the lowest whose accepted views reach the target precision as a Clopper-Pearson lower bound.
A level that cannot is switched off and said so.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np

from ..speciesnet.ensemble import Classification
from .calibrate import acceptance_threshold, fit_logistic, grouped_folds
from .evidence import DEPTH_LEVEL, FEATURES, CardModel, Queries, QueryEvidence, Vocabulary
from .stages import Centroids, StageConfig, label_depth

__all__ = ["decide"]

_LEVEL_DEPTH = {v: k for k, v in DEPTH_LEVEL.items()}
_CHUNK = 8192


def _off(calibration: dict, notes: list[str], config: StageConfig, reason: str) -> None:
    for level in config.calibrated_levels:
        calibration["levels"][level] = {"enabled": False, "reason": reason}
    notes.append(f"calibrated re-classification is off: {reason}")


def decide(candidates: Queries, keys: list, originals: list[str], ref_keys: list, ref_scores: np.ndarray,
           ref_queries: Queries, cents: Centroids, cent_vectors: np.ndarray, cent_labels: list[str],
           member_of_ref: np.ndarray, degraded, taxonomy_map: dict, allowed: Callable[[str], bool],
           config: StageConfig, project, prompt_of, seed: int = 0,
           stage=lambda name: nullcontext()) -> tuple[dict, dict, list[str]]:
    """Decisions (key -> reclassification object) for the candidates, the calibration report, notes."""
    calibration = {"decision": "calibrated", "target_precision": config.target_precision,
                   "confidence": config.confidence, "levels": {}, "features": list(FEATURES)}
    notes: list[str] = []
    if degraded is None or not len(degraded.labels):
        _off(calibration, notes, config, "no degraded reference views stored for this run (pass 1 renders them "
                                         "for stage-1 references; rerun pass 1 with this version)")
        return {}, calibration, notes
    with stage("calibrate"):
        found = _calibrate(degraded, ref_keys, ref_scores, ref_queries, cents, cent_vectors, cent_labels,
                           member_of_ref, taxonomy_map, allowed, config, project, prompt_of, seed, calibration, notes)
    if found is None:
        return {}, calibration, notes
    card, models, thresholds, depths = found
    decisions: dict = {}
    with stage("score"):
        for start in range(0, len(candidates.coarse), _CHUNK):
            rows = np.arange(start, min(start + _CHUNK, len(candidates.coarse)))
            _decide_chunk(QueryEvidence(card, candidates.take(rows)), rows, keys, originals, models, thresholds,
                          depths, decisions)
    return decisions, calibration, notes


def _calibrate(degraded, ref_keys: list, ref_scores: np.ndarray, ref_queries: Queries, cents: Centroids,
               cent_vectors: np.ndarray, cent_labels: list[str], member_of_ref: np.ndarray, taxonomy_map: dict,
               allowed: Callable[[str], bool], config: StageConfig, project, prompt_of, seed: int,
               calibration: dict, notes: list[str]):
    """(card model, fold models, thresholds per depth, depths), or None when calibration switched pass 2 off.

    `ref_queries` holds the card's stage-1 references as queries: their labels (as `hidden_label`), events,
    top-5 and quality.
    """
    ref_labels, ref_events = ref_queries.hidden_label, ref_queries.events
    vocab = Vocabulary(taxonomy_map)
    card = CardModel(vocab, cents, cent_vectors, cent_labels, member_of_ref, ref_labels, ref_scores, ref_events,
                     allowed, config, list(zip(ref_queries.top_classes, ref_queries.top_scores)))
    ref_index = {key: j for j, key in enumerate(ref_keys)}
    source = np.array([ref_index.get((fp, int(d)), -1) for fp, d in zip(degraded.filepaths, degraded.detections)],
                      dtype=np.int64)
    usable = source >= 0
    if not usable.any():
        _off(calibration, notes, config, "the degraded views' source references are not stage-1 references now")
        return None
    if usable.sum() > config.calibration_views:
        keep = np.random.default_rng(seed).choice(np.flatnonzero(usable), config.calibration_views, replace=False)
        usable = np.zeros_like(usable)
        usable[keep] = True
        notes.append(f"calibrated on a sample of {config.calibration_views} of {len(source)} degraded views")
    known = np.array([lab != Classification.BLANK for lab in degraded.labels], dtype=bool)
    views = np.flatnonzero(usable)
    hidden = np.flatnonzero(usable & known)
    order = np.concatenate([views, hidden])
    raw_views = np.asarray(degraded.vectors, dtype=np.float32)[order]  # only the views in use
    vectors = project(raw_views)
    views_q = Queries(
        vectors=vectors,
        coarse=[Classification.ANIMAL.value if known[i] else Classification.BLANK.value for i in order],
        events=[ref_events[source[i]] for i in order],
        top_classes=[degraded.top_classes[i] for i in order], top_scores=[degraded.top_scores[i] for i in order],
        quality=np.asarray(degraded.quality, dtype=np.float64)[order],
        bird_prompt=prompt_of(raw_views),  # prompts live in the encoder's space, before the head
        source_ref=source[order],
        hidden_label=[None] * len(views) + [degraded.labels[i] for i in hidden])
    # The sampled references themselves, clean, as unknown species: on a real card an unknown animal's
    # sharp, well-lit crops are coarse too, so sharpness must not pass for correctness.
    sampled = np.unique(source[hidden])
    clean = Queries(
        vectors=ref_queries.vectors[sampled], coarse=[Classification.ANIMAL.value] * sampled.size,
        events=[ref_events[j] for j in sampled], top_classes=[ref_queries.top_classes[j] for j in sampled],
        top_scores=[ref_queries.top_scores[j] for j in sampled], quality=ref_queries.quality[sampled],
        bird_prompt=ref_queries.bird_prompt[sampled], source_ref=sampled,
        hidden_label=[ref_labels[j] for j in sampled])
    cal = _concat(views_q, clean)
    truth = [degraded.labels[i] for i in order] + [ref_labels[j] for j in sampled]
    groups = [f"{degraded.filepaths[i]}#{int(degraded.detections[i])}" for i in order] + [
        f"{ref_keys[j][0]}#{int(ref_keys[j][1])}" for j in sampled]
    calibration["rows"] = {"clean_unknown": int(sampled.size)}
    ev = QueryEvidence(card, cal)
    depths = [_LEVEL_DEPTH[lev] for lev in config.calibrated_levels]
    x, y, qrow, qdepth = [], [], [], []
    truth_ids = vocab.ids_of([t if t != Classification.BLANK else "" for t in truth])
    for depth in depths:
        right_taxon = vocab.ancestors(depth)[truth_ids]
        for proposal in ev.proposals(depth):
            rows = np.flatnonzero(proposal >= 0)
            if rows.size:
                x.append(ev.features(depth, proposal)[rows])
                y.append((right_taxon[rows] == proposal[rows]) & (truth_ids[rows] >= 0))
                qrow.append(rows)
                qdepth.append(np.full(rows.size, depth))
    calibration["rows"].update({"views": int(usable.sum()), "known": int((usable & known).sum()),
                                "background": int((usable & ~known).sum()), "queries": len(truth)})
    if not x:
        _off(calibration, notes, config, "no proposal on any held-out view (too few references for centroids "
                                         "or bursts)")
        return None
    x, y, qrow, qdepth = np.concatenate(x), np.concatenate(y), np.concatenate(qrow), np.concatenate(qdepth)
    calibration["rows"].update({"proposals": int(len(y)), "right": int(y.sum())})
    folds = grouped_folds(groups, config.folds, seed)[qrow]
    oof = np.full(len(y), np.nan)
    models: dict[int, list] = {}
    for depth in depths:
        # One model per level: what makes a species right is not what makes a class right.
        at = qdepth == depth
        for f in range(config.folds):
            train = at & (folds != f)
            test = at & (folds == f)
            if not test.any():
                continue
            if not train.any() or y[train].all() or not y[train].any():
                oof[test] = float(train.any() and y[train].all())  # no model: that level decides nothing
                continue
            model = fit_logistic(x[train], y[train], ridge=config.ridge)
            models.setdefault(depth, []).append(model)
            oof[test] = model.predict(x[test])
    if not models or np.isnan(oof).any():
        _off(calibration, notes, config, "held-out views gave only right or only wrong proposals, or too few "
                                         "references to cross-fit; nothing to calibrate on")
        return None
    calibration["model"] = {DEPTH_LEVEL[d]: {"folds": len(m), "mean_weights": dict(zip(
        FEATURES, np.round(np.mean([k.weights for k in m], axis=0), 4).tolist()))} for d, m in models.items()}
    thresholds = _thresholds(oof, y, qrow, qdepth, len(truth), depths, config, calibration)
    off = [lev for lev, c in calibration["levels"].items() if not c["enabled"]]
    if off:
        notes.append(f"calibrated levels switched off (precision bound below {config.target_precision:.2f}): "
                     f"{', '.join(off)}")
    if not thresholds:
        return None
    return card, models, thresholds, depths


def _concat(a: Queries, b: Queries) -> Queries:
    """Rows of a, then rows of b."""
    return Queries(np.concatenate([a.vectors, b.vectors]), a.coarse + b.coarse, a.events + b.events,
                   a.top_classes + b.top_classes, a.top_scores + b.top_scores,
                   np.concatenate([a.quality, b.quality]), np.concatenate([a.bird_prompt, b.bird_prompt]),
                   np.concatenate([a.source_ref, b.source_ref]), a.hidden_label + b.hidden_label)


def _thresholds(oof: np.ndarray, y: np.ndarray, qrow: np.ndarray, qdepth: np.ndarray, n: int, depths: list[int],
                config: StageConfig, calibration: dict) -> dict[int, dict]:
    """Per level, most specific first, the acceptance threshold over the views not yet decided above it."""
    decided = np.zeros(n, dtype=bool)  # n: calibration queries
    found_all: dict[int, dict] = {}
    for depth in depths:
        at = qdepth == depth
        best_p = np.full(n, -1.0)
        best_ok = np.zeros(n, dtype=bool)
        order = np.lexsort((oof[at], qrow[at]))  # per row, ascending probability: the last one wins
        rows, probs, oks = qrow[at][order], oof[at][order], y[at][order]
        best_p[rows], best_ok[rows] = probs, oks
        open_rows = np.flatnonzero((best_p >= 0) & ~decided)
        level = DEPTH_LEVEL[depth]
        found = acceptance_threshold(best_p[open_rows], best_ok[open_rows], config.target_precision,
                                     config.confidence) if open_rows.size else None
        if found is None:
            calibration["levels"][level] = {
                "enabled": False, "rows": int(open_rows.size),
                "reason": f"no threshold reaches a {config.confidence:.0%} lower bound of "
                          f"{config.target_precision:.2f} on {open_rows.size} held-out views"}
            continue
        found["enabled"] = True
        calibration["levels"][level] = found
        found_all[depth] = found
        decided[open_rows[best_p[open_rows] >= found["threshold"]]] = True
    return found_all


def _decide_chunk(ev: QueryEvidence, rows: np.ndarray, keys: list, originals: list[str], models: dict,
                  thresholds: dict[int, dict], depths: list[int], decisions: dict) -> None:
    n = len(rows)
    done = np.zeros(n, dtype=bool)
    for depth in depths:
        if depth not in thresholds or depth not in models:
            continue
        best_p = np.full(n, -1.0)
        best_prop = np.full(n, -1, dtype=np.int64)
        best_f = np.zeros((n, len(FEATURES)))
        for proposal in ev.proposals(depth):
            live = np.flatnonzero((proposal >= 0) & ~done & (ev.coarse_depth < depth))
            if not live.size:
                continue
            f = ev.features(depth, proposal)[live]
            p = np.mean([m.predict(f) for m in models[depth]], axis=0)
            better = p > best_p[live]
            idx = live[better]
            best_p[idx], best_prop[idx], best_f[idx] = p[better], proposal[idx], f[better]
        take = np.flatnonzero(~done & (best_prop >= 0) & (best_p >= thresholds[depth]["threshold"]))
        for i in take:
            key = keys[rows[i]]
            decisions[key] = _record(ev.card.vocab.names[best_prop[i]], depth, originals[rows[i]], best_p[i],
                                     thresholds[depth], best_f[i])
        done[take] = True


def _record(label: str, depth: int, original: str, probability: float, calibrated: dict, f: np.ndarray) -> dict:
    """The `reclassification` object of a calibrated decision, with the evidence behind it."""
    named = dict(zip(FEATURES, (float(v) for v in f)))
    sources = [name for name, key in (("burst", "burst_votes_log"), ("embedding", "nearest"),
                                      ("speciesnet", "speciesnet_mass")) if named[key] > 0]
    out = {
        "class": label, "level": DEPTH_LEVEL[depth], "stage": "calibrated", "original": original,
        "probability": round(float(probability), 4), "threshold": round(calibrated["threshold"], 4),
        "precision_bound": round(calibrated["lower_bound"], 4), "calibrated_on": calibrated["accepted"],
        "sources": sources,
        "evidence": {
            "burst": {"votes": int(round(np.expm1(named["burst_votes_log"]))), "share": round(named["burst_share"], 4),
                      "best_score": round(named["burst_best_score"], 4)},
            "embedding": {"distance": round(named["distance"], 4), "margin": round(named["margin"], 4),
                          "nearest": bool(named["nearest"])},
            "speciesnet": {"mass": round(named["speciesnet_mass"], 4)},
            "quality": {"side_px": round(float(2 ** named["log2_side_px"]), 1),
                        "brightness": round(named["brightness"], 4), "colourfulness": round(named["colourfulness"], 4)},
        },
    }
    if original in (Classification.BLANK, Classification.ANIMAL) and label.split(";")[1] == "aves":
        out["via"] = "birds"
    return out
