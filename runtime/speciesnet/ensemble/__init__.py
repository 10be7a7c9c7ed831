"""SpeciesNet's decision logic (overrides, geofence, roll-up), ported with no speciesnet import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from .combiner import DEFAULT_THRESHOLDS, EnsembleThresholds, combine_predictions
from .geofence import (
    geofence_animal_classification,
    roll_up_labels_to_first_matching_level,
    should_geofence_animal_classification,
)
from .taxonomy import get_ancestor_at_level, get_full_class_string, label_level, load_taxonomy
from .vocabulary import (
    DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION,
    DEFAULT_MAX_CLASSIFICATIONS_PER_DETECTION,
    FORMAT_VERSION,
    NUM_CLASSIFICATIONS_FOR_ENSEMBLE,
    Classification,
    Detection,
    Failure,
)

__all__ = [
    "Classification",
    "DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION",
    "DEFAULT_MAX_CLASSIFICATIONS_PER_DETECTION",
    "Detection",
    "Ensemble",
    "EnsembleThresholds",
    "FORMAT_VERSION",
    "Failure",
    "NUM_CLASSIFICATIONS_FOR_ENSEMBLE",
    "combine_predictions",
    "geofence_animal_classification",
    "get_ancestor_at_level",
    "get_full_class_string",
    "label_level",
    "load_geofence",
    "load_taxonomy",
    "roll_up_labels_to_first_matching_level",
    "should_geofence_animal_classification",
]


def load_geofence(path: Union[str, Path]) -> dict:
    """Reads a SpeciesNet geofence JSON ({5-field key: {"allow"|"block": {ISO3: [admin1]}}})."""
    with open(path, encoding="utf-8") as fp:
        geofence_map = json.load(fp)
    if not isinstance(geofence_map, dict):
        raise ValueError(f"{path}: geofence must be a JSON object, got {type(geofence_map).__name__}")
    return geofence_map


class Ensemble:
    """SpeciesNet's ensemble over one image's classified detections, with its taxonomy and geofence."""

    def __init__(
        self,
        taxonomy_map: dict,
        geofence_map: dict,
        enable_geofence: bool = True,
        thresholds: EnsembleThresholds = DEFAULT_THRESHOLDS,
    ) -> None:
        self.taxonomy_map = taxonomy_map
        self.geofence_map = geofence_map
        self.enable_geofence = enable_geofence
        self.thresholds = thresholds

    @classmethod
    def from_files(
        cls, taxonomy: Union[str, Path], geofence: Union[str, Path], enable_geofence: bool = True
    ) -> Ensemble:
        """Loads the taxonomy and geofence files a SpeciesNet model folder or bundle ships."""
        return cls(load_taxonomy(taxonomy), load_geofence(geofence), enable_geofence)

    def decide(
        self,
        classifications_list: list[dict],
        detections: list[dict],
        country: Optional[str] = None,
        admin1_region: Optional[str] = None,
    ) -> list[dict]:
        """Returns SpeciesNet's processed classification for each (top-5, detection) pair."""
        top = NUM_CLASSIFICATIONS_FOR_ENSEMBLE
        return combine_predictions(
            classifications_list=[
                {"classes": c["classes"][:top], "scores": c["scores"][:top]}
                for c in classifications_list
            ],
            detections=detections,
            country=country,
            admin1_region=admin1_region,
            taxonomy_map=self.taxonomy_map,
            geofence_map=self.geofence_map,
            enable_geofence=self.enable_geofence,
            geofence_fn=geofence_animal_classification,
            roll_up_fn=roll_up_labels_to_first_matching_level,
            thresholds=self.thresholds,
        )
