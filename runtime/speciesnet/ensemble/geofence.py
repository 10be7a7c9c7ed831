"""Geofence rules and SpeciesNet's taxonomic roll-up of top-k scores."""

from __future__ import annotations

from typing import Optional

from .taxonomy import LEVELS, get_ancestor_at_level, get_full_class_string
from .vocabulary import Classification

__all__ = [
    "Prediction",
    "check_location",
    "geofence_animal_classification",
    "geofence_vocabulary",
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


def geofence_vocabulary(geofence_map: dict) -> dict[str, set[str]]:
    """Every country (ISO3) the geofence names, with the admin1 regions it names for each."""
    vocabulary: dict[str, set[str]] = {}
    for rules in geofence_map.values():
        for kind in ("allow", "block"):
            for country, regions in (rules.get(kind) or {}).items():
                vocabulary.setdefault(country, set()).update(regions or [])
    return vocabulary


def check_location(country: Optional[str], admin1_region: Optional[str],
                   geofence_map: dict) -> tuple[Optional[str], Optional[str]]:
    """Upper-cased (country, admin1), refused with close matches when the geofence would silently ignore them."""
    import difflib

    if country is None:
        if admin1_region is not None:
            raise ValueError("--admin1 needs --country")
        return None, None
    country = country.strip().upper()
    if len(country) != 3 or not country.isalpha():
        raise ValueError(f"--country must be an ISO 3166-1 alpha-3 code such as USA or KEN, got {country!r}")
    vocabulary = geofence_vocabulary(geofence_map)
    if vocabulary and country not in vocabulary:
        close = difflib.get_close_matches(country, sorted(vocabulary), n=4, cutoff=0.3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"--country {country}: not in this bundle's geofence ({len(vocabulary)} countries), so the "
                         f"geofence would do nothing{hint}; use --no-geofence to run without it")
    if admin1_region is None:
        return country, None
    admin1_region = admin1_region.strip().upper()
    if len(admin1_region) != 2:
        raise ValueError(f"--admin1 must be a 2-character ISO 3166-2 region code such as CA, got {admin1_region!r}")
    regions = vocabulary.get(country, set())
    if vocabulary and admin1_region not in regions:
        if not regions:
            raise ValueError(f"--admin1 {admin1_region}: this bundle's geofence has no regions for {country} "
                             "(SpeciesNet's has them for USA only); leave --admin1 out")
        close = difflib.get_close_matches(admin1_region, sorted(regions), n=4, cutoff=0.3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"--admin1 {admin1_region}: not a region of {country} in this bundle's geofence{hint}")
    return country, admin1_region
