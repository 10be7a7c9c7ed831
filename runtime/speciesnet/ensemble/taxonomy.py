"""Taxonomy lookups on SpeciesNet's 7-field labels (uuid;class;order;family;genus;species;common)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .vocabulary import Classification

__all__ = [
    "LEVELS",
    "get_ancestor_at_level",
    "get_full_class_string",
    "label_level",
    "load_taxonomy",
    "split_label",
]

LEVELS = ("species", "genus", "family", "order", "class", "kingdom")
_RANKS = 5  # class, order, family, genus, species


def split_label(label: str) -> list[str]:
    """Splits a label into its seven fields, refusing anything else."""
    parts = label.split(";")
    if len(parts) != 7:
        raise ValueError(f"Expected label made of 7 parts, but found only {len(parts)}: {label}")
    return parts


def get_full_class_string(label: str) -> str:
    """Returns the 5-field taxonomy key `class;order;family;genus;species` of a label."""
    return ";".join(split_label(label)[1:6])


def get_ancestor_at_level(label: str, taxonomy_level: str, taxonomy_map: dict) -> Optional[str]:
    """Returns the taxonomy's label for this label's ancestor at a level, or None if it has none."""
    ranks = split_label(label)[1:6]
    if taxonomy_level == "kingdom":
        if not ranks[0] and label != Classification.ANIMAL:
            return None
        return taxonomy_map.get(";" * (_RANKS - 1))
    if taxonomy_level not in LEVELS:
        return None
    depth = _RANKS - LEVELS.index(taxonomy_level)
    if not ranks[depth - 1]:
        return None
    return taxonomy_map.get(";".join(ranks[:depth] + [""] * (_RANKS - depth)))


def label_level(label: str) -> str:
    """Names the most specific rank a label carries ("kingdom" for animal, "" for blank etc.)."""
    ranks = split_label(label)[1:6]
    for depth in range(_RANKS, 0, -1):
        if ranks[depth - 1]:
            return LEVELS[_RANKS - depth]
    return "kingdom" if label == Classification.ANIMAL else ""


def load_taxonomy(path: Union[str, Path]) -> dict[str, str]:
    """Reads a taxonomy file into {5-field key: label}, as SpeciesNet's ensemble builds it."""
    with open(path, encoding="utf-8") as fp:
        labels = [line.strip() for line in fp]
    taxonomy_map = {get_full_class_string(label): label for label in labels if label}
    for special in (Classification.BLANK, Classification.VEHICLE, Classification.UNKNOWN):
        taxonomy_map.pop(get_full_class_string(special), None)
    for special in (Classification.HUMAN, Classification.ANIMAL):
        taxonomy_map[get_full_class_string(special)] = special.value
    return taxonomy_map
