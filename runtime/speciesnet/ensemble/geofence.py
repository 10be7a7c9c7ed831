"""Geofence rules and SpeciesNet's taxonomic roll-up of top-k scores."""

from __future__ import annotations

from typing import Optional

from .taxonomy import LEVELS, get_ancestor_at_level, get_full_class_string
from .vocabulary import Classification

__all__ = [
    "Prediction",
    "geofence_animal_classification",
    "roll_up_labels_to_first_matching_level",
    "should_geofence_animal_classification",
]

Prediction = tuple[str, float, str]

GEOFENCE_ROLLUP_LEVELS = ("family", "order", "class", "kingdom")
GEOFENCE_ROLLUP_SLACK = 1e-10


def should_geofence_animal_classification(
    label: str,
    country: Optional[str],
    admin1_region: Optional[str],
    geofence_map: dict,
    enable_geofence: bool,
) -> bool:
    """Says whether a label is ruled out at this country (ISO3) and admin1 region."""
    if not enable_geofence or not country:
        return False
    if len(country) != 3:
        raise ValueError(f"Invalid country code {country}")
    if admin1_region and len(admin1_region) != 2:
        raise ValueError(f"Invalid region code {admin1_region}")
    rules = geofence_map.get(get_full_class_string(label))
    if rules is None:
        return False
    allow = rules.get("allow")
    if allow:
        if country not in allow:
            return True
        regions = allow[country]
        if admin1_region and regions and admin1_region not in regions:
            return True
    block = rules.get("block")
    if block and country in block:
        regions = block[country]
        if not regions or (admin1_region and admin1_region in regions):
            return True
    return False


def roll_up_labels_to_first_matching_level(
    labels: list[str],
    scores: list[float],
    country: Optional[str],
    admin1_region: Optional[str],
    target_taxonomy_levels: list[str],
    non_blank_threshold: float,
    taxonomy_map: dict,
    geofence_map: dict,
    enable_geofence: bool,
) -> Optional[Prediction]:
    """Sums scores per ancestor level by level; returns the first allowed ancestor above threshold."""
    unknown = set(target_taxonomy_levels).difference(LEVELS)
    if unknown:
        raise ValueError(
            f"Unexpected target taxonomy level(s): {unknown}. "
            f"Expected only levels from the set: {set(LEVELS)}."
        )
    for level in target_taxonomy_levels:
        sums: dict[str, float] = {}
        for label, score in zip(labels, scores):
            ancestor = get_ancestor_at_level(label, level, taxonomy_map)
            if ancestor:
                sums[ancestor] = sums.get(ancestor, 0.0) + score
        best_label, best_score = None, 0.0
        for ancestor, total in sums.items():
            if total > best_score and not should_geofence_animal_classification(
                ancestor, country, admin1_region, geofence_map, enable_geofence
            ):
                best_label, best_score = ancestor, total
        if best_label and best_score > non_blank_threshold:
            return best_label, best_score, f"classifier+rollup_to_{level}"
    return None


def geofence_animal_classification(
    *,
    labels: list[str],
    scores: list[float],
    country: Optional[str],
    admin1_region: Optional[str],
    taxonomy_map: dict,
    geofence_map: dict,
    enable_geofence: bool,
) -> Prediction:
    """Keeps the top label unless geofenced; then rolls up to the nearest allowed ancestor."""
    if not should_geofence_animal_classification(
        labels[0], country, admin1_region, geofence_map, enable_geofence
    ):
        return labels[0], scores[0], "classifier"
    rollup = roll_up_labels_to_first_matching_level(
        labels=labels,
        scores=scores,
        country=country,
        admin1_region=admin1_region,
        target_taxonomy_levels=list(GEOFENCE_ROLLUP_LEVELS),
        non_blank_threshold=scores[0] - GEOFENCE_ROLLUP_SLACK,
        taxonomy_map=taxonomy_map,
        geofence_map=geofence_map,
        enable_geofence=enable_geofence,
    )
    if rollup is None:
        return Classification.UNKNOWN.value, scores[0], "classifier+geofence+rollup_failed"
    label, score, source = rollup
    return label, score, "classifier+geofence+" + source[len("classifier+") :]
