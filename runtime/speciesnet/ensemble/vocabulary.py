"""SpeciesNet's special labels, detector categories, failure flags and output constants."""

from __future__ import annotations

import enum
from typing import Optional

__all__ = [
    "Classification",
    "DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION",
    "DEFAULT_MAX_CLASSIFICATIONS_PER_DETECTION",
    "Detection",
    "FORMAT_VERSION",
    "Failure",
    "NUM_CLASSIFICATIONS_FOR_ENSEMBLE",
]

FORMAT_VERSION = "20261015"
DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION = 0.1
DEFAULT_MAX_CLASSIFICATIONS_PER_DETECTION = 2
NUM_CLASSIFICATIONS_FOR_ENSEMBLE = 5


class Classification(str, enum.Enum):
    """Labels with a special meaning in SpeciesNet's decision logic (7-field label strings)."""

    BLANK = "f1856211-cfb7-4a5b-9158-c0f72fd09ee6;;;;;;blank"
    ANIMAL = "1f689929-883d-4dae-958c-3d57ab5b6c16;;;;;;animal"
    HUMAN = "990ae9dd-7a59-4344-afcb-1b7b21368000;mammalia;primates;hominidae;homo;sapiens;human"
    VEHICLE = "e2895ed5-780b-48f6-8a11-9e27cb594511;;;;;;vehicle"
    UNKNOWN = (
        "f2efdae9-efb8-48fb-8a91-eccf79ab4ffb;no cv result;no cv result;no cv result;"
        "no cv result;no cv result;no cv result"
    )


class Detection(str, enum.Enum):
    """Detector labels; category "0" is the whole-image pseudo-detection."""

    WHOLE_IMAGE = "whole_image_classification"
    ANIMAL = "animal"
    HUMAN = "human"
    VEHICLE = "vehicle"

    @classmethod
    def from_category(cls, category: str) -> Optional[Detection]:
        """Maps a detector category string ("0".."3") to its label, or None if unknown."""
        return _CATEGORIES.get(category)


_CATEGORIES = {
    "0": Detection.WHOLE_IMAGE,
    "1": Detection.ANIMAL,
    "2": Detection.HUMAN,
    "3": Detection.VEHICLE,
}


class Failure(enum.Flag):
    """Which component failed on an image, written out by name."""

    CLASSIFIER = enum.auto()
    DETECTOR = enum.auto()
    GEOLOCATION = enum.auto()
