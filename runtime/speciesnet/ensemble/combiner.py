"""SpeciesNet's ensemble cascade: one (class, score, source) per classified detection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .vocabulary import Classification, Detection

__all__ = ["EnsembleThresholds", "combine_predictions"]

ROLLUP_LEVELS = ("genus", "family", "order", "class", "kingdom")


@dataclass(frozen=True)
class EnsembleThresholds:
    """SpeciesNet 5.0.6's thresholds; every comparison is strict, as in SpeciesNet.

    Attributes:
        human_detector: 1a, a human detection above this is HUMAN on the detector's word.
        mid_detector: 1b/2a/2c/4b, the detection confidence the classifier needs beside it.
        human_classifier: 1b/2a, the classifier score that confirms a human.
        vehicle_detector: 2b, a vehicle detection above this is VEHICLE.
        vehicle_classifier: 2c, the classifier score that confirms a vehicle.
        blank_detector: 3a, a detection below this lets a blank classification stand...
        blank_classifier: 3a, ...when the blank score is above this.
        blank_alone: 3b, a blank score above this stands on its own.
        animal_alone: 4a, an animal label above this stands (subject to the geofence).
        animal_with_detector: 4b, an animal label above this stands beside a mid animal detection.
        rollup: 5a, the summed top-5 score an ancestor needs.
        animal_detector: 5b, an animal detection above this makes the crop ANIMAL.
    """

    human_detector: float = 0.7
    mid_detector: float = 0.2
    human_classifier: float = 0.5
    vehicle_detector: float = 0.7
    vehicle_classifier: float = 0.4
    blank_detector: float = 0.2
    blank_classifier: float = 0.5
    blank_alone: float = 0.99
    animal_alone: float = 0.8
    animal_with_detector: float = 0.65
    rollup: float = 0.65
    animal_detector: float = 0.5


DEFAULT_THRESHOLDS = EnsembleThresholds()
_NOT_ANIMAL = {Classification.BLANK, Classification.HUMAN, Classification.VEHICLE}


def combine_predictions(
    *,
    classifications_list: list[dict],
    detections: list[dict],
    country: Optional[str],
    admin1_region: Optional[str],
    taxonomy_map: dict,
    geofence_map: dict,
    enable_geofence: bool,
    geofence_fn: Callable,
    roll_up_fn: Callable,
    thresholds: EnsembleThresholds = DEFAULT_THRESHOLDS,
) -> list[dict]:
    """Decides each classification (top-5 classes and scores) beside its paired detection."""
    if len(classifications_list) != len(detections):
        raise ValueError(
            f"Expected one detection per classification, got {len(classifications_list)} "
            f"classifications and {len(detections)} detections."
        )
    context = dict(
        country=country,
        admin1_region=admin1_region,
        taxonomy_map=taxonomy_map,
        geofence_map=geofence_map,
        enable_geofence=enable_geofence,
    )
    t = thresholds
    results = []
    for classifications, det in zip(classifications_list, detections):
        det_label, det_conf = det["label"], det["conf"]
        labels, scores = classifications["classes"], classifications["scores"]
        top, top_score = labels[0], scores[0]
        decision: Optional[tuple] = None

        if det_label == Detection.HUMAN:
            if det_conf > t.human_detector:
                decision = (Classification.HUMAN, det_conf, "detector")
            elif (
                det_conf > t.mid_detector
                and top in (Classification.HUMAN, Classification.VEHICLE)
                and top_score > t.human_classifier
            ):
                decision = (Classification.HUMAN, top_score, "classifier")

        if decision is None and det_label == Detection.VEHICLE:
            if (
                det_conf > t.mid_detector
                and top == Classification.HUMAN
                and top_score > t.human_classifier
            ):
                decision = (Classification.HUMAN, top_score, "classifier")
            elif det_conf > t.vehicle_detector:
                decision = (Classification.VEHICLE, det_conf, "detector")
            elif (
                det_conf > t.mid_detector
                and top == Classification.VEHICLE
                and top_score > t.vehicle_classifier
            ):
                decision = (Classification.VEHICLE, top_score, "classifier")

        if decision is None:
            if top == Classification.BLANK:
                if (det_conf < t.blank_detector and top_score > t.blank_classifier) or (
                    top_score > t.blank_alone
                ):
                    decision = (Classification.BLANK, top_score, "classifier")
            elif top not in _NOT_ANIMAL and (
                top_score > t.animal_alone
                or (
                    top_score > t.animal_with_detector
                    and det_label == Detection.ANIMAL
                    and det_conf > t.mid_detector
                )
            ):
                decision = geofence_fn(labels=labels, scores=scores, **context)

        if decision is None:
            decision = roll_up_fn(
                labels=labels,
                scores=scores,
                target_taxonomy_levels=list(ROLLUP_LEVELS),
                non_blank_threshold=t.rollup,
                **context,
            )
            if not decision:
                if det_label == Detection.ANIMAL and det_conf > t.animal_detector:
                    decision = (Classification.ANIMAL, det_conf, "detector")
                else:
                    decision = (Classification.UNKNOWN, top_score, "classifier")

        label, score, source = decision
        results.append(
            {
                "class": label.value if isinstance(label, Classification) else label,
                "score": score,
                "source": source,
            }
        )
    return results
