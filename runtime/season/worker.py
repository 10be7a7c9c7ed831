"""A batch worker: loaded pipelines (one Station per location) that run chunks and finish cards; Ray wraps it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .shards import ChunkJob, merge_shards, write_shard
from ..station import FORMATS, Station

__all__ = ["ChunkWorker", "FinishJob"]


@dataclass(frozen=True)
class FinishJob:
    """A card whose chunks all ran: merge the shards not yet merged, then pass 2 and its outputs."""

    card: str
    out: str
    location: tuple[Optional[str], Optional[str]] = (None, None)
    merge: tuple[int, ...] = ()
    formats: tuple[str, ...] = FORMATS
    export_crops: bool = False


class ChunkWorker:
    """Keeps the sessions loaded between chunks; `settings` are Station's keywords (bundle, device, stages...)."""

    def __init__(self, settings: dict) -> None:
        self.settings = dict(settings)
        self.stations: dict[tuple, Station] = {}

    def station(self, location: tuple[Optional[str], Optional[str]]) -> Station:
        """The Station for a card's country and admin1, opened once."""
        key = tuple(location)
        if key not in self.stations:
            settings = dict(self.settings)
            bundle = settings.pop("bundle")
            self.stations[key] = Station(bundle, country=key[0], admin1=key[1], **settings)
        return self.stations[key]

    def chunk(self, job: ChunkJob) -> dict:
        """Pass 1 over one chunk into its shard; returns images done, seconds and this process's id."""
        started = time.perf_counter()
        images = write_shard(self.station(job.location), job)
        return {"images": images, "seconds": time.perf_counter() - started, "pid": os.getpid()}

    def finish(self, job: FinishJob) -> dict:
        """Merges the last shards, then pass 2 and every output of one card; returns its report as plain values."""
        merge_shards(Path(job.out), job.merge)
        report = self.station(job.location).finish(job.card, job.out, formats=job.formats,
                                                   export_crops=job.export_crops)
        return {"images": report.images, "detections": report.detections, "failed": len(report.failed),
                "labels": report.labels, "seconds": report.seconds}

    def pid(self) -> int:
        """This worker's process id (tests and benchmarks find workers with it)."""
        return os.getpid()
