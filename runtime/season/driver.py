"""The season driver: plans each card's chunks, feeds a pool, merges shards, finishes cards, writes the season."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..card.ingest import ImageRecord
from ..outputs.store import STORE_NAME, Store
from .pools import Pool
from .cards import CardSpec
from .outputs import CardSummary, write_season
from .shards import FINISHED_META, ChunkJob, chunked, clear_shards, done_shards, merge_shards
from ..station import FORMATS, Station
from .worker import FinishJob

__all__ = ["DEFAULT_CHUNK", "CardRun", "SeasonReport", "run_season"]

logger = logging.getLogger("trapedge")
DEFAULT_CHUNK = 256


@dataclass
class CardRun:
    """One card's progress through the season: chunks left, status and, on failure, the reason."""

    spec: CardSpec
    out: Path
    pending: list[tuple[int, list[ImageRecord]]] = field(default_factory=list)
    unmerged: list[int] = field(default_factory=list)
    images: int = 0
    status: str = "running"
    reason: str = ""
    busy: bool = False
    finished: bool = False

    def fail(self, error: BaseException) -> None:
        """Marks the card failed with a one-line reason; the season goes on."""
        self.status, self.busy = "failed", False
        self.reason = " ".join(str(error).split()) or type(error).__name__
        logger.warning("%s: failed: %s", self.spec.deployment_id, self.reason)


@dataclass
class SeasonReport:
    """What the season run did: cards by status, images, chunk runs and the season files."""

    root: Path
    cards: list[CardSummary]
    chunks_run: int
    seconds: float
    written: list[Path]
    chunk_times: list[tuple[float, float]] = field(default_factory=list)

    @property
    def failed(self) -> list[CardSummary]:
        """Cards that failed, with their reasons."""
        return [c for c in self.cards if c.status == "failed"]


Progress = Callable[[int, int], None]


def run_season(specs: list[CardSpec], root: Path, pool: Pool, stations: Callable[[tuple], Station], *,
               chunk: int = DEFAULT_CHUNK, progress: Optional[Progress] = None, formats: tuple[str, ...] = FORMATS,
               export_crops: bool = False) -> SeasonReport:
    """Runs every card through the pool (chunks of a card in order, cards side by side) and writes the season;
    each card gets `formats` and, with `export_crops`, its crops and thumbnails (people by the station's privacy)."""
    started = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cards = [_plan(spec, root / spec.deployment_id, stations, chunk) for spec in specs]
    total = sum(c.images for c in cards)
    done = total - sum(len(r) for c in cards for _, r in c.pending)
    calls: dict[int, tuple[CardRun, str, float]] = {}
    chunks_run, chunk_times = 0, []
    if progress is not None:
        progress(done, total)
    while True:
        for card in cards:
            if pool.free() <= 0:
                break
            if card.status != "running" or card.busy:
                continue
            if card.pending:
                calls[pool.submit("chunk", _chunk_job(card))] = (card, "chunk", time.perf_counter())
            else:
                job = FinishJob(str(card.spec.card), str(card.out), card.spec.location, tuple(card.unmerged),
                                formats, export_crops)
                card.unmerged = []
                calls[pool.submit("finish", job)] = (card, "finish", time.perf_counter())
            card.busy = True
        if not calls:
            break
        for token, value, error in pool.results():
            card, kind, submitted = calls.pop(token)
            card.busy = False
            if error is not None:
                card.fail(error)
            elif kind == "chunk":
                chunks_run += 1
                chunk_times.append((time.perf_counter() - submitted, value["seconds"]))
                index, records = card.pending.pop(0)
                card.unmerged.append(index)
                done += len(records)
                if progress is not None:
                    progress(done, total)
            else:
                _mark_done(card)
    summaries = [_summary(c) for c in cards]
    written = write_season(root, summaries, report="report" in formats)
    return SeasonReport(root, summaries, chunks_run, time.perf_counter() - started, written, chunk_times)


def _plan(spec: CardSpec, out: Path, stations: Callable[[tuple], Station], size: int) -> CardRun:
    """Readies a card's output folder, merges shards a killed run left, and lists the chunks still to run."""
    card = CardRun(spec, out)
    try:
        records, todo = stations(spec.location).prepare(spec.card, out, deployment=spec.deployment)
        card.images = len(records)
        existing = done_shards(out)
        merge_shards(out, tuple(sorted(existing)))
        todo_keys = {r.key for r in todo}
        for index, part in enumerate(chunked(records, size)):
            left = [r for r in part if r.key in todo_keys]
            if left and index not in existing:
                card.pending.append((index, left))
        card.finished = not card.pending and _is_done(out)
    except (OSError, ValueError) as e:
        card.fail(e)
    if card.finished:
        card.status = "done"
    return card


def _chunk_job(card: CardRun) -> ChunkJob:
    """The card's next chunk; its worker first merges the shards before it and resumes from the store (as `run`)."""
    index, records = card.pending[0]
    job = ChunkJob(str(card.spec.card), str(card.out), index, tuple(records), card.spec.location,
                   tuple(card.unmerged))
    card.unmerged = []
    return job


def _is_done(out: Path) -> bool:
    store = Store(out / STORE_NAME)
    try:
        return store.get_meta(FINISHED_META) == "1" and (out / "predictions.json").is_file()
    finally:
        store.close()


def _mark_done(card: CardRun) -> None:
    """Records a finished card (a rerun skips it) and removes its shards."""
    store = Store(card.out / STORE_NAME)
    try:
        store.set_meta(FINISHED_META, "1")
    finally:
        store.close()
    clear_shards(card.out)
    card.status, card.finished = "done", True


def _summary(card: CardRun) -> CardSummary:
    return CardSummary(card.spec.deployment_id, str(card.spec.card), card.out, card.status, card.reason,
                       card.spec.deployment)
