"""Pass 2: the five re-classification stages over a card's stored arrays, calibrated on degraded references."""

from .passtwo import DegradedTable, EmbeddingTable, EvidenceTable, PassTwoInputs, PassTwoResult, pass_two
from .stages import DECISIONS, SCORING, StageConfig

__all__ = ["DECISIONS", "DegradedTable", "EmbeddingTable", "EvidenceTable", "PassTwoInputs", "PassTwoResult",
           "SCORING", "StageConfig", "pass_two"]
