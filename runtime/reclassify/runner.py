"""Pass 2 for a bundle: loads taxonomy, geofence, head and prompts, then calls `pass_two` on a card's tables."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..timing import StageTimer
from ..models.bundle import Bundle
from ..speciesnet.ensemble import load_geofence, load_taxonomy, should_geofence_animal_classification
from .passtwo import DegradedTable, EmbeddingTable, EvidenceTable, PassTwoInputs, PassTwoResult, pass_two
from .stages import Centroids, StageConfig

__all__ = ["CENTROID_SOURCES", "Reclassifier"]

CENTROID_SOURCES = ("bundle", "dump", "both")


class Reclassifier:
    """Runs stages 1-5 over a finished pass 1 and adds `reclassification` objects to the predictions."""

    def __init__(self, bundle: Bundle, config: StageConfig = StageConfig(), *, centroids: str = "dump",
                 country: Optional[str] = None, admin1_region: Optional[str] = None, enable_geofence: bool = True,
                 device: str = "cpu", events: Optional[dict[str, str]] = None, event_pooling: bool = False,
                 precision: str = "fp32") -> None:
        if centroids not in CENTROID_SOURCES:
            raise ValueError(f"--centroids must be one of {', '.join(CENTROID_SOURCES)}, got {centroids!r}")
        if centroids != "dump" and "centroids" not in bundle.manifest["files"]:
            raise ValueError(f"{bundle.root}: --centroids {centroids} needs a bundle with a centroid file "
                             "(trapedge fit)")
        if event_pooling and config.decision not in ("adaptive", "nearest"):
            raise ValueError("--event-pooling scores an event's crops together for --decision adaptive or nearest; "
                             f"it does not apply to --decision {config.decision}")
        from .embed import head_backend, load_prompts

        self.bundle = bundle
        self.config = config
        self.centroid_source = centroids
        self.country, self.admin1_region, self.enable_geofence = country, admin1_region, enable_geofence
        self.taxonomy_map = load_taxonomy(bundle.file("taxonomy"))
        self.geofence_map = load_geofence(bundle.file("geofence"))
        self.head = head_backend(bundle, device, precision)
        self.prompts, self.bird_rows = load_prompts(bundle)
        if bundle.manifest.get("embedding", {}).get("model", "classifier") == "classifier":
            self.prompts, self.bird_rows = None, []  # prompts live in an encoder's space, not the classifier's
        self.timer = StageTimer()
        self.summary: dict[str, int] = {}
        self.result: Optional[PassTwoResult] = None
        self.events = events or {}
        self.event_pooling = event_pooling

    def allowed(self, label: str) -> bool:
        """True when the geofence allows this taxon here."""
        return not should_geofence_animal_classification(label, self.country, self.admin1_region,
                                                         self.geofence_map, self.enable_geofence)

    def run(self, predictions: list[dict], table: EmbeddingTable, evidence: Optional[EvidenceTable] = None,
            degraded: Optional[DegradedTable] = None) -> dict[str, int]:
        """Adds `reclassification` to every detection a stage touched; returns counts per stage."""
        from .embed import apply_head

        shipped = self._shipped()
        result = pass_two(
            PassTwoInputs(predictions, table, evidence, degraded, self.events), self.taxonomy_map, self.allowed,
            self.config, head=lambda v: apply_head(v, self.head), prompts=self.prompts,
            bird_rows=self.bird_rows, shipped=shipped, card_references=self.centroid_source != "bundle",
            event_pooling=self.event_pooling, timer=self.timer)
        result.apply(predictions)
        self.result = result
        self.summary = result.counts
        return result.counts

    def _shipped(self) -> Optional[tuple[np.ndarray, list[str]]]:
        """The bundle's shipped reference embeddings and labels, when --centroids bundle or both."""
        if self.centroid_source == "dump":
            return None
        shipped = Centroids.load(self.bundle.file("centroids"))
        if shipped.references is None:
            raise ValueError(f"{self.bundle.file('centroids')}: holds no references; refit it with trapedge fit")
        return shipped.references, list(shipped.reference_labels)
