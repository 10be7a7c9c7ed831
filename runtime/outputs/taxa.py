"""Label and taxon helpers shared by the writers: a detection's final label, its level, taxon and names."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from ..speciesnet.ensemble import Classification
from ..speciesnet.ensemble.taxonomy import label_level
from .speciesnet_json import DECIMALS

__all__ = [
    "DETECTOR_LABELS",
    "DETECTOR_TYPES",
    "Final",
    "RANK_NAMES",
    "RELABELLING_STAGES",
    "WHOLE_IMAGE",
    "common_name",
    "final",
    "final_label",
    "level",
    "observation_type",
    "reclassified",
    "taxon",
]

WHOLE_IMAGE = "0"
DETECTOR_LABELS = {"1": Classification.ANIMAL.value, "2": Classification.HUMAN.value,
                   "3": Classification.VEHICLE.value}
DETECTOR_TYPES = {"1": "animal", "2": "human", "3": "vehicle"}
RANK_NAMES = ("class", "order", "family", "genus")
_HUMAN_RANKS = ["mammalia", "primates", "hominidae", "homo"]
RELABELLING_STAGES = ("birds", "score", "calibrated", "smoothing")


class Final(NamedTuple):
    """The label a detection ends with, its probability, the method that chose it and the stage."""

    label: str
    probability: float
    method: str
    stage: str


def final(det: dict) -> Final:
    """The final label of a detection: a stage's re-label, else SpeciesNet's processed class, else the detector's."""
    rec = det.get("reclassification")
    processed = det.get("processed_classification")
    if rec and rec.get("stage") in RELABELLING_STAGES and rec.get("class") != rec.get("original"):
        if rec["stage"] == "calibrated" or "probability" in rec:
            probability = rec["probability"]
            method = f"trapedge calibrated pass 2 ({'+'.join(rec.get('sources') or []) or 'evidence'}, precision " \
                     f">= {rec['precision_bound']:.3f})"
        elif rec["stage"] == "smoothing":
            probability = _coarse_probability(det, processed)
            method = "trapedge burst smoothing (event's confident species)"
        elif rec["stage"] == "birds":
            bird = [v for v in (rec.get("aves_score"), rec.get("bird_prompt")) if v is not None]
            probability = max(bird) if bird else float(det.get("conf", 0.0))
            method = "trapedge stage 2 (birds)"
        else:
            probability = _coarse_probability(det, processed)
            method = f"trapedge stage 5 ({rec.get('scoring', 'cosine')})"
            if rec.get("via") == "birds":
                method = f"trapedge stage 2 (birds) + stage 5 ({rec.get('scoring', 'cosine')})"
        return Final(rec["class"], _probability(probability), method, rec["stage"])
    if processed:
        return Final(processed["class"], _probability(processed["score"]),
                     f"speciesnet {processed.get('source', 'classifier')}", "speciesnet")
    label = DETECTOR_LABELS.get(str(det.get("category")), Classification.UNKNOWN.value)
    return Final(label, _probability(det.get("conf", 0.0)), "megadetector", "detector")


def _coarse_probability(det: dict, processed: Optional[dict]) -> float:
    if processed is None or processed["class"] == Classification.BLANK:
        return float(det.get("conf", 0.0))
    return float(processed["score"])


def _probability(value: Any) -> float:
    return round(min(max(float(value), 0.0), 1.0), DECIMALS)


def final_label(det: dict) -> tuple[str, float, str]:
    """The label a detection ends with (a stage's re-label, else SpeciesNet's processed class), probability, method."""
    chosen = final(det)
    return chosen.label, chosen.probability, chosen.method


def _fields(label: str) -> Optional[list[str]]:
    parts = label.split(";")
    return parts if len(parts) == 7 else None


def common_name(label: str) -> str:
    """The most specific name a label carries (its common name, else its deepest rank; the label itself if bare)."""
    parts = _fields(label)
    if parts is None:
        return label or "unknown"
    named = [p for p in parts[1:7] if p]
    return named[-1] if named else "unknown"


def _is_human(label: str) -> bool:
    parts = _fields(label)
    return parts is not None and parts[1:5] == _HUMAN_RANKS


def level(label: str) -> str:
    """The taxonomic level of a label ("" for unknown and labels that are not taxonomy strings)."""
    if label == Classification.UNKNOWN or _fields(label) is None:
        return ""
    return label_level(label)


def taxon(label: str) -> Optional[dict]:
    """Camtrap DP taxonomic entry of a label, or None for blank, vehicle, unknown and the like."""
    parts = _fields(label)
    if parts is None or label in (Classification.BLANK, Classification.VEHICLE, Classification.UNKNOWN):
        return None
    rank = label_level(label)
    if not rank:
        return None
    ranks = dict(zip(("class", "order", "family", "genus", "species"), parts[1:6]))
    entry: dict[str, Any] = {"kingdom": "Animalia"}
    for name in RANK_NAMES:
        if ranks[name]:
            entry[name] = ranks[name].capitalize()
    if rank == "kingdom":
        scientific = "Animalia"
    elif rank == "species":
        scientific = f"{ranks['genus'].capitalize()} {ranks['species']}".strip()
    else:
        scientific = ranks[rank].capitalize()
    result = {"scientificName": scientific, "taxonRank": rank, **entry}
    if parts[6]:
        result["vernacularNames"] = {"eng": parts[6]}
    return result


def observation_type(label: str, category: str) -> str:
    """Camtrap DP observationType of a final label (blank, vehicle, unknown, human, animal), else the detector's."""
    if label == Classification.BLANK:
        return "blank"
    if label == Classification.VEHICLE:
        return "vehicle"
    if label == Classification.UNKNOWN:
        return "unknown"
    if _is_human(label):
        return "human"
    if taxon(label) is not None:
        return "animal"
    return DETECTOR_TYPES.get(category, "unknown")


def reclassified(det: dict) -> bool:
    """True when a pass-2 stage re-labelled the detection."""
    return final(det).stage in RELABELLING_STAGES
