"""Chunk shards: one chunk's pass-1 results in a store file of its own, written under a temp name and renamed."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..atomic import fsync_dir
from ..card.ingest import ImageRecord
from ..faults import checkpoint
from ..outputs.store import STORE_NAME, Store
from ..pipeline import MAX_SIDES

__all__ = ["FINISHED_META", "SHARDS", "ChunkJob", "chunked", "clear_shards", "done_shards", "merge_shards", "runs",
           "shard_path", "write_shard"]

SHARDS = ".shards"
RUNS_LOG = "chunk-runs.log"
FINISHED_META = "batch_finished"


@dataclass(frozen=True)
class ChunkJob:
    """One chunk of one card: which photos, where its shard goes, and the earlier shards to merge first."""

    card: str
    out: str
    index: int
    records: tuple[ImageRecord, ...]
    location: tuple[Optional[str], Optional[str]] = (None, None)
    merge: tuple[int, ...] = ()


def chunked(records: list[ImageRecord], size: int) -> list[list[ImageRecord]]:
    """A card's photos in scan order, cut into chunks of `size` (the same cut on every rerun)."""
    size = max(1, int(size))
    return [records[i : i + size] for i in range(0, len(records), size)]


def shard_path(out: Path, index: int) -> Path:
    """Where chunk `index` of the card in `out` keeps its shard."""
    return Path(out) / SHARDS / f"chunk-{index:05d}.sqlite"


def done_shards(out: Path) -> set[int]:
    """Indices of the chunks whose shard was renamed into place (complete by construction)."""
    folder = Path(out) / SHARDS
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.sqlite")}


def merge_shards(out: Path, indices: tuple[int, ...]) -> tuple[dict[str, int], list[float]]:
    """Merges the given shards into the card's store (idempotent) and returns the sampler state pass 1 resumes from.

    A card's chunks run one after another, so the store has one writer at a time: the worker of its next chunk.
    """
    store = Store(Path(out) / STORE_NAME)
    try:
        for index in indices:
            store.set_meta(FINISHED_META, "0")
            store.merge(shard_path(out, index))
            checkpoint("merge")
        return store.degraded_counts(), store.coarse_sides(MAX_SIDES)
    finally:
        store.close()


def write_shard(station, job: ChunkJob) -> int:
    """Runs pass 1 over the chunk into a temp store, then renames it into place: a killed chunk leaves no shard."""
    resume = merge_shards(Path(job.out), job.merge)
    final = shard_path(Path(job.out), job.index)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    for leftover in (temp, temp.with_name(temp.name + "-wal"), temp.with_name(temp.name + "-shm")):
        leftover.unlink(missing_ok=True)
    store = Store(temp)
    try:
        done = station.pass_one(job.card, list(job.records), store, resume=resume, each=lambda _done: checkpoint("chunk"))
    finally:
        store.close()
    os.replace(temp, final)
    fsync_dir(final.parent)
    _record_run(Path(job.out), job.index, done)
    return done


def _record_run(out: Path, index: int, images: int) -> None:
    """Appends one line per finished chunk run (tests and benchmarks count re-done work with it)."""
    with open(out / SHARDS / RUNS_LOG, "a", encoding="utf-8") as fp:
        fp.write(f"{index} {images} {os.getpid()}\n")


def runs(out: Path) -> list[tuple[int, int, int]]:
    """(chunk, images, pid) of every chunk run recorded for the card in `out`."""
    path = Path(out) / SHARDS / RUNS_LOG
    if not path.is_file():
        return []
    return [tuple(int(v) for v in line.split()) for line in path.read_text(encoding="utf-8").splitlines() if line]


def clear_shards(out: Path, keep_log: bool = True) -> None:
    """Removes a finished card's shards (and temp files of killed chunks); the run log stays unless asked."""
    folder = Path(out) / SHARDS
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if keep_log and path.name == RUNS_LOG:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
