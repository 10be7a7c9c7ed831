"""Bursts: images grouped into events per camera folder by EXIF capture time, and event-level helpers."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Optional, Sequence

import numpy as np

from .video import video_key

__all__ = ["DEFAULT_GAP_S", "dominant_labels", "group_events", "pool_by_event"]

DEFAULT_GAP_S = 60.0


def group_events(images: Sequence[dict], gap_s: float = DEFAULT_GAP_S) -> dict[str, str]:
    """Maps image key to event id: same camera folder, each photo within `gap_s` of the previous one.

    Photos are ordered by capture time, ties broken by file name. A photo without an EXIF capture time
    falls back to its file modification time (`modified_ns`, which cameras set when they write the file);
    with neither it is an event of its own. Every sampled frame of one video is one event.
    """
    by_folder: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    events: dict[str, str] = {}
    for image in images:
        key = image["key"]
        video = video_key(key)
        if video is not None:
            events[key] = f"{video}#video"
            continue
        captured = image.get("captured")
        folder = str(PurePosixPath(key).parent)
        if captured:
            when = datetime.fromisoformat(captured)
        elif image.get("modified_ns"):
            when = datetime.fromtimestamp(image["modified_ns"] / 1e9, tz=timezone.utc).replace(tzinfo=None)
        else:
            events[key] = f"{folder}#{PurePosixPath(key).name}"
            continue
        by_folder[folder].append((when, key))
    for folder, shots in by_folder.items():
        shots.sort(key=lambda s: (s[0], PurePosixPath(s[1]).name))
        number, previous = 0, None
        for when, key in shots:
            if previous is not None and (when - previous).total_seconds() > gap_s:
                number += 1
            events[key] = f"{folder}#{number:05d}"
            previous = when
    return events


def dominant_labels(labels: Sequence[Optional[str]], events: Sequence[str]) -> dict[str, str]:
    """The most common species-level label per event (ties to the label seen first)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for label, event in zip(labels, events):
        if label:
            counts[event][label] += 1
    return {event: c.most_common(1)[0][0] for event, c in counts.items()}


def pool_by_event(vectors: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Replaces each vector with the normalised mean of its group's vectors (views of one animal)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    pooled = np.empty_like(vectors)
    index: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        index[g].append(i)
    for rows in index.values():
        mean = vectors[rows].mean(axis=0)
        pooled[rows] = mean / max(np.linalg.norm(mean), 1e-12)
    return pooled
