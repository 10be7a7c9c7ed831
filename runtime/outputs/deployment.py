"""A camera deployment as Camtrap DP describes it, its clock's time zone, and ISO 8601 time parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["CAPTURE_METHODS", "FEATURE_TYPES", "Deployment", "parse_time", "parse_zone"]

FEATURE_TYPES = ("roadPaved", "roadDirt", "trailHiking", "trailGame", "roadUnderpass", "roadOverpass",
                 "roadBridge", "culvert", "burrow", "nestSite", "carcass", "waterSource", "fruitingTree")
CAPTURE_METHODS = ("activityDetection", "timeLapse")

_OFFSET = re.compile(r"^(?:UTC)?([+-])(\d{1,2}):?(\d{2})?$")


def parse_zone(value: str) -> tzinfo:
    """An IANA zone (Africa/Windhoek) or a fixed UTC offset (+02:00, -0530, UTC+2) as a tzinfo."""
    match = _OFFSET.match(value.strip())
    if match:
        sign, hours, minutes = match.group(1), int(match.group(2)), int(match.group(3) or 0)
        if hours > 14 or minutes > 59:
            raise ValueError(f"UTC offset {value!r} is out of range (-14:00 to +14:00)")
        delta = timedelta(hours=hours, minutes=minutes)
        return timezone(-delta if sign == "-" else delta)
    if value.strip().upper() in ("UTC", "Z"):
        return timezone.utc
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown timezone {value!r}: give an IANA name (e.g. Africa/Windhoek) or a UTC offset "
                         "(e.g. +02:00)") from e


def parse_time(value: str, what: str) -> datetime:
    """An ISO 8601 time (a trailing Z read as UTC); a ValueError naming `what` otherwise."""
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"{what}: not an ISO 8601 time: {value!r}") from e


@dataclass(frozen=True)
class Deployment:
    """One camera deployment as Camtrap DP describes it; `timezone` is the camera clock's IANA zone."""

    deployment_id: str
    latitude: float
    longitude: float
    timezone: str
    location_id: Optional[str] = None
    location_name: Optional[str] = None
    coordinate_uncertainty: Optional[int] = None
    start: Optional[str] = None
    end: Optional[str] = None
    setup_by: Optional[str] = None
    camera_id: Optional[str] = None
    camera_model: Optional[str] = None
    camera_delay: Optional[int] = None
    camera_height: Optional[float] = None
    camera_depth: Optional[float] = None
    camera_tilt: Optional[int] = None
    camera_heading: Optional[int] = None
    detection_distance: Optional[float] = None
    timestamp_issues: bool = False
    bait_use: Optional[bool] = None
    feature_type: Optional[str] = None
    habitat: Optional[str] = None
    groups: Optional[str] = None
    tags: Optional[str] = None
    comments: Optional[str] = None
    capture_method: str = "activityDetection"

    def __post_init__(self) -> None:
        if not self.deployment_id or not self.deployment_id.strip():
            raise ValueError("deployment_id must not be empty")
        if not -90 <= self.latitude <= 90:
            raise ValueError(f"latitude must be within [-90, 90], got {self.latitude}")
        if not -180 <= self.longitude <= 180:
            raise ValueError(f"longitude must be within [-180, 180], got {self.longitude}")
        parse_zone(self.timezone)
        if self.coordinate_uncertainty is not None and self.coordinate_uncertainty < 1:
            raise ValueError(f"coordinate_uncertainty must be at least 1 m, got {self.coordinate_uncertainty}")
        if self.feature_type is not None and self.feature_type not in FEATURE_TYPES:
            raise ValueError(f"feature_type must be one of {', '.join(FEATURE_TYPES)}, got {self.feature_type!r}")
        if self.capture_method not in CAPTURE_METHODS:
            raise ValueError(f"capture_method must be one of {', '.join(CAPTURE_METHODS)}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None:
                parse_time(value, name)

    @property
    def zone(self) -> tzinfo:
        """The camera clock's time zone."""
        return parse_zone(self.timezone)

    @classmethod
    def from_dict(cls, values: dict) -> Deployment:
        """Builds a deployment from a dict of field names, refusing unknown keys by name."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown deployment fields: {', '.join(sorted(unknown))}")
        return cls(**values)
