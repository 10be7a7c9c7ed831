"""Result files the ecosystem reads (SpeciesNet, MegaDetector 1.6, Camtrap DP 1.0.2, flat CSV), one module each."""

from ..atomic import atomic_write_text
from .camtrap_dp import (
    CAMTRAP_DP_PROFILE, CAMTRAP_DP_SCHEMAS, CAMTRAP_DP_VERSION, DEPLOYMENT_COLUMNS, MEDIA_COLUMNS, OBSERVATION_COLUMNS,
    write_camtrap_dp,
)
from .deployment import Deployment, parse_zone
from .flat_csv import FLAT_COLUMNS, write_flat_csv
from .megadetector import MEGADETECTOR_DETECTION_CATEGORIES, MEGADETECTOR_FORMAT_VERSION, write_megadetector_json
from .speciesnet_json import ImageInfo, limit_float_precision, write_images_csv, write_predictions_json
from .taxa import final_label

__all__ = [
    "CAMTRAP_DP_PROFILE",
    "CAMTRAP_DP_SCHEMAS",
    "CAMTRAP_DP_VERSION",
    "DEPLOYMENT_COLUMNS",
    "Deployment",
    "FLAT_COLUMNS",
    "ImageInfo",
    "MEDIA_COLUMNS",
    "MEGADETECTOR_DETECTION_CATEGORIES",
    "MEGADETECTOR_FORMAT_VERSION",
    "OBSERVATION_COLUMNS",
    "atomic_write_text",
    "final_label",
    "limit_float_precision",
    "parse_zone",
    "write_camtrap_dp",
    "write_flat_csv",
    "write_images_csv",
    "write_megadetector_json",
    "write_predictions_json",
]
