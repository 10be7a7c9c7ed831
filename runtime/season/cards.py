"""A season's cards: a folder of card folders or a CSV of cards with their deployments, read and checked."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["CSV_COLUMNS", "CardSpec", "read_cards"]

CSV_COLUMNS = ("card", "deployment_id", "country", "admin1", "timezone", "lat", "lon")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class CardSpec:
    """One card of the season: its folder, deployment id (its output folder's name), location and deployment."""

    card: Path
    deployment_id: str
    country: Optional[str] = None
    admin1: Optional[str] = None
    deployment: Optional[dict] = None

    @property
    def location(self) -> tuple[Optional[str], Optional[str]]:
        """(country, admin1): the geofence settings this card's station needs."""
        return self.country, self.admin1


def read_cards(cards: Path, defaults: Optional[dict] = None) -> list[CardSpec]:
    """The season's cards from a folder of card folders or a CSV (columns CSV_COLUMNS); defaults fill blanks."""
    cards, defaults = Path(cards), dict(defaults or {})
    if cards.is_dir():
        rows = [{"card": str(p.resolve()), "deployment_id": p.name} for p in sorted(cards.iterdir())
                if p.is_dir() and not p.name.startswith(".")]
        if not rows:
            raise ValueError(f"{cards}: no card folders in it; give a folder of card folders or a CSV")
    elif cards.is_file():
        rows = _csv_rows(cards)
    else:
        raise ValueError(f"{cards}: no such folder or CSV file")
    specs, seen = [], set()
    for number, row in enumerate(rows, start=2):
        spec = _spec(row, defaults, cards.parent if cards.is_file() else cards, f"{cards}: row {number}")
        if spec.deployment_id in seen:
            raise ValueError(f"{cards}: deployment id {spec.deployment_id!r} appears twice; each card needs its own")
        seen.add(spec.deployment_id)
        specs.append(spec)
    return specs


def _csv_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fp:
            reader = csv.DictReader(fp)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 CSV ({e})") from e
    unknown = sorted(set(header) - set(CSV_COLUMNS))
    if "card" not in header or unknown:
        raise ValueError(f"{path}: expected columns {', '.join(CSV_COLUMNS)} (card required)"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    if not rows:
        raise ValueError(f"{path}: lists no cards")
    return rows


def _spec(row: dict, defaults: dict, base: Path, where: str) -> CardSpec:
    value = lambda key: row.get(key) or defaults.get(key)  # noqa: E731
    if not row.get("card"):
        raise ValueError(f"{where}: no card path")
    card = Path(row["card"]).expanduser()
    card = card if card.is_absolute() else (base / card).resolve()
    deployment_id = row.get("deployment_id") or card.name
    if not _ID.match(deployment_id):
        raise ValueError(f"{where}: deployment id {deployment_id!r} must be letters, digits, '.', '_' or '-'")
    place = {"timezone": value("timezone"), "latitude": _number(value("lat"), where, "lat"),
             "longitude": _number(value("lon"), where, "lon")}
    deployment = {**place, "deployment_id": deployment_id} if any(v is not None for v in place.values()) else None
    return CardSpec(card, deployment_id, value("country") or None, value("admin1") or None, deployment)


def _number(text, where: str, name: str) -> Optional[float]:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError as e:
        raise ValueError(f"{where}: {name} {text!r} is not a number") from e
