"""The paper's metrics for a finished run against a truth CSV (filepath, detection, label)."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_text
from .stages import label_depth

__all__ = ["evaluate", "load_truth", "write_report"]

_RECLASSIFYING = ("birds", "score", "calibrated", "smoothing")


def _key(label: str) -> list[str]:
    parts = label.split(";")
    return parts[1:6] if len(parts) == 7 else (parts + [""] * 5)[:5]


def _correct(predicted: str, truth: str) -> bool:
    """A label is right when the true taxon lies within it (a genus is right for any of its species)."""
    depth = label_depth(predicted)
    return depth > 0 and _key(predicted)[:depth] == _key(truth)[:depth]


def load_truth(path: Path) -> dict[tuple[str, int], str]:
    """Reads `filepath,detection,label` rows (label: 7-field SpeciesNet label or 5-field taxonomy key)."""
    truth = {}
    with open(path, newline="", encoding="utf-8") as fp:
        reader = csv.DictReader(fp)
        missing = {"filepath", "detection", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: truth CSV needs columns filepath, detection, label (missing {sorted(missing)})")
        for line, row in enumerate(reader, start=2):
            try:
                truth[(row["filepath"], int(row["detection"]))] = row["label"].strip()
            except ValueError as e:
                raise ValueError(f"{path}:{line}: bad detection index {row['detection']!r}") from e
    return truth


def evaluate(predictions: list[dict], truth: dict[tuple[str, int], str]) -> dict:
    """Accuracy of re-classified detections, species-level share, bird accuracy, per-class P/R, unknowns forced."""
    references = set()
    touched = []
    for pred in predictions:
        for idx, det in enumerate(pred.get("detections") or []):
            rec = det.get("reclassification")
            if rec and rec["stage"] == "accept":
                references.add(tuple(_key(rec["class"])))
            true = truth.get((pred["filepath"], idx))
            if true is not None:
                touched.append((rec, true))
    reclassified = [(r, t) for r, t in touched if r and r["stage"] in _RECLASSIFYING]
    scored = [(r, t) for r, t in reclassified if r["stage"] in ("score", "calibrated", "smoothing")]
    bird = [(r, t) for r, t in reclassified if r["stage"] == "birds" or r.get("via") == "birds"]
    correct = [_correct(r["class"], t) for r, t in reclassified]
    unknown = [(r, t) for r, t in touched if tuple(_key(t)) not in references and label_depth(t) == 5
               and (r is None or r["stage"] != "accept")]
    forced = [r for r, t in unknown if r and r["stage"] in _RECLASSIFYING and r["level"] == "species"]
    predicted_counts, hits, true_counts = Counter(), Counter(), Counter()
    for r, t in scored:
        if r["level"] == "species":
            predicted_counts[r["class"]] += 1
            hits[r["class"]] += _key(r["class"]) == _key(t)
    for r, t in touched:
        if r is None or r["stage"] != "accept":
            true_counts[";".join(_key(t))] += 1
    recall_hits = defaultdict(int)
    for r, t in scored:
        if r["level"] == "species" and _key(r["class"]) == _key(t):
            recall_hits[";".join(_key(t))] += 1
    per_class = {
        label.split(";")[-1] or label: {"predicted": n, "precision": hits[label] / n,
                                        "recall": recall_hits[";".join(_key(label))]
                                        / max(true_counts[";".join(_key(label))], 1)}
        for label, n in sorted(predicted_counts.items())
    }
    bird_ok = [_key(t)[0] == "aves" for r, t in bird]
    return {
        "detections_with_truth": len(touched),
        "reclassified": len(reclassified),
        "accuracy": _share(correct),
        "species_level_share": _share([r["level"] == "species" for r, _ in scored]),
        "bird_override": {"count": len(bird), "accuracy": _share(bird_ok)},
        "unknown_species": {"detections": len(unknown), "forced_into_known": len(forced),
                            "share_forced": len(forced) / len(unknown) if unknown else None},
        "per_class": per_class,
    }


def _share(flags: list[bool]) -> Optional[float]:
    return sum(flags) / len(flags) if flags else None


def write_report(result: dict, outdir: Path) -> Path:
    """Writes evaluation.json and evaluation.md."""
    atomic_write_text(outdir / "evaluation.json", json.dumps(result, indent=2) + "\n")
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = ["# Re-classification evaluation", "", "| metric | value |", "|---|---|",
             f"| detections with truth | {result['detections_with_truth']} |",
             f"| re-classified (stages 2 and 5) | {result['reclassified']} |",
             f"| accuracy of re-classified | {fmt(result['accuracy'])} |",
             f"| reaching species level (stage 5) | {fmt(result['species_level_share'])} |",
             f"| bird override | {result['bird_override']['count']} at {fmt(result['bird_override']['accuracy'])} |",
             f"| unknown species forced into a known one | {result['unknown_species']['forced_into_known']} of "
             f"{result['unknown_species']['detections']} ({fmt(result['unknown_species']['share_forced'])}) |",
             "", "| class | predicted | precision | recall |", "|---|---|---|---|"]
    lines += [f"| {name} | {v['predicted']} | {fmt(v['precision'])} | {fmt(v['recall'])} |"
              for name, v in result["per_class"].items()]
    atomic_write_text(outdir / "evaluation.md", "\n".join(lines) + "\n")
    return outdir / "evaluation.md"
