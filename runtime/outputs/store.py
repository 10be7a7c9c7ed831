"""SQLite results store (stdlib sqlite3, WAL): every image's state, prediction and embeddings; resumable."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..faults import checkpoint

__all__ = ["STORE_NAME", "ScanDiff", "Store"]

STORE_NAME = "results.sqlite"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    key TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, status TEXT NOT NULL,
    width INTEGER, height INTEGER, captured TEXT, reason TEXT, prediction TEXT NOT NULL,
    vanished INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings (
    key TEXT NOT NULL, detection INTEGER NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (key, detection));
CREATE TABLE IF NOT EXISTS evidence (
    key TEXT NOT NULL, detection INTEGER NOT NULL, top TEXT NOT NULL, quality BLOB NOT NULL,
    PRIMARY KEY (key, detection));
CREATE TABLE IF NOT EXISTS degraded (
    key TEXT NOT NULL, detection INTEGER NOT NULL, view INTEGER NOT NULL, label TEXT NOT NULL, kind TEXT NOT NULL,
    vector BLOB NOT NULL, top TEXT NOT NULL, quality BLOB NOT NULL, PRIMARY KEY (key, detection, view));
"""


@dataclass(frozen=True)
class ScanDiff:
    """What a scan of the card means for the store: what to (re)do, what to keep, what vanished."""

    todo: list
    unchanged: list
    changed: list
    vanished: list[str]


class Store:
    """The run's results, one row per image, committed image by image (WAL, fsync on commit)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        stored = self.get_meta("schema_version")
        if stored is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(stored) != SCHEMA_VERSION:
            raise ValueError(f"{self.path}: results store schema {stored} is not supported (expected {SCHEMA_VERSION})")

    def close(self) -> None:
        """Closes the connection."""
        self.db.close()

    def get_meta(self, key: str) -> Optional[str]:
        """A stored run setting, or None."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Stores a run setting."""
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def diff(self, records: Iterable) -> ScanDiff:
        """Compares a scan with the store: new and changed (size or mtime) and failed images are to do."""
        known = {k: (s, m, st) for k, s, m, st in self.db.execute("SELECT key, size, mtime_ns, status FROM images")}
        todo, unchanged, changed, seen = [], [], [], set()
        for record in records:
            seen.add(record.key)
            previous = known.get(record.key)
            if previous is None:
                todo.append(record)
            elif previous[:2] != (record.size, record.mtime_ns):
                changed.append(record)
                todo.append(record)
            elif previous[2] == "failed":
                todo.append(record)
            else:
                unchanged.append(record)
        vanished = sorted(set(known) - seen)
        with self._transaction():
            self.db.execute("UPDATE images SET vanished = 0")
            self.db.executemany("UPDATE images SET vanished = 1 WHERE key = ?", [(k,) for k in vanished])
        return ScanDiff(todo, unchanged, changed, vanished)

    def _transaction(self):
        return _Transaction(self.db)

    def put(self, result) -> None:
        """Commits one image's pass-1 result (prediction, state and embeddings) in one transaction."""
        record = result.record
        prediction = dict(result.prediction)
        prediction.pop("filepath", None)
        reason = result.error or "; ".join(result.warnings) or None
        with self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO images (key, size, mtime_ns, status, width, height, captured, reason,"
                " prediction, vanished, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (record.key, record.size, record.mtime_ns, result.status, result.width, result.height,
                 result.captured, reason, json.dumps(prediction), time.time()))
            self.db.execute("DELETE FROM embeddings WHERE key = ?", (record.key,))
            self.db.executemany(
                "INSERT INTO embeddings (key, detection, vector) VALUES (?, ?, ?)",
                [(record.key, int(i), np.asarray(v, dtype=np.float32).tobytes())
                 for i, v in sorted(result.embeddings.items())])
            self.db.execute("DELETE FROM evidence WHERE key = ?", (record.key,))
            self.db.executemany(
                "INSERT INTO evidence (key, detection, top, quality) VALUES (?, ?, ?, ?)",
                [(record.key, int(i), json.dumps(top), np.asarray(quality, dtype=np.float32).tobytes())
                 for i, (top, quality) in sorted(result.evidence.items())])
            self.db.execute("DELETE FROM degraded WHERE key = ?", (record.key,))
            self.db.executemany(
                "INSERT INTO degraded (key, detection, view, label, kind, vector, top, quality)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(record.key, int(v.detection), n, v.label, v.kind, np.asarray(v.vector, dtype=np.float32).tobytes(),
                  json.dumps(v.top), np.asarray(v.quality, dtype=np.float32).tobytes())
                 for n, v in enumerate(result.degraded)])
            checkpoint("commit")

    def predictions(self, root: Path) -> list[dict]:
        """Every stored prediction in key order, with `filepath` under the dump's current root."""
        root = Path(root).resolve()
        out = []
        for key, text in self.db.execute("SELECT key, prediction FROM images ORDER BY key"):
            prediction = json.loads(text)
            out.append({"filepath": str(root / key), **prediction})
        return out

    def images(self, root: Path) -> list[dict]:
        """One dict per stored image (key, filepath, width, height, captured, status, reason)."""
        root = Path(root).resolve()
        rows = self.db.execute(
            "SELECT key, width, height, captured, status, reason, vanished, mtime_ns FROM images ORDER BY key")
        return [{"key": k, "filepath": str(root / k), "width": w, "height": h, "captured": c,
                 "status": "vanished" if v else s, "reason": r, "modified_ns": m}
                for k, w, h, c, s, r, v, m in rows]

    def embeddings(self, root: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(filepaths, detection indices, vectors) of every stored embedding."""
        root = Path(root).resolve()
        rows = self.db.execute("SELECT key, detection, vector FROM embeddings ORDER BY key, detection").fetchall()
        vectors = np.stack([np.frombuffer(v, dtype=np.float32) for _, _, v in rows]) if rows else np.zeros((0, 0))
        return ([str(root / k) for k, _, _ in rows], np.array([d for _, d, _ in rows], dtype=np.int64),
                vectors.astype(np.float32))

    def evidence(self, root: Path):
        """SpeciesNet's top-5 and crop quality of every stored detection that pass 2 reads."""
        from ..reclassify import EvidenceTable

        root = Path(root).resolve()
        rows = self.db.execute("SELECT key, detection, top, quality FROM evidence ORDER BY key, detection").fetchall()
        tops = [json.loads(t) for _, _, t, _ in rows]
        quality = np.stack([np.frombuffer(q, dtype=np.float32) for *_, q in rows]) if rows else np.zeros((0, 3))
        return EvidenceTable([str(root / k) for k, *_ in rows], np.array([d for _, d, _, _ in rows], dtype=np.int64),
                             [t[0] for t in tops], [t[1] for t in tops], quality.astype(np.float32))

    def degraded(self, root: Path):
        """Every stored degraded reference view (pass 2 calibrates on them)."""
        from ..reclassify import DegradedTable

        root = Path(root).resolve()
        rows = self.db.execute("SELECT key, detection, label, kind, vector, top, quality FROM degraded"
                               " ORDER BY key, detection, view").fetchall()
        tops = [json.loads(r[5]) for r in rows]
        vectors = np.stack([np.frombuffer(r[4], dtype=np.float32) for r in rows]) if rows else np.zeros((0, 0))
        quality = np.stack([np.frombuffer(r[6], dtype=np.float32) for r in rows]) if rows else np.zeros((0, 3))
        return DegradedTable([str(root / r[0]) for r in rows], np.array([r[1] for r in rows], dtype=np.int64),
                             [r[2] for r in rows], [r[3] for r in rows], vectors.astype(np.float32),
                             [t[0] for t in tops], [t[1] for t in tops], quality.astype(np.float32))

    def coarse_sides(self, limit: int) -> list[float]:
        """Box sides (pixels) of stored coarse candidates, in key order (pass 1 resumes rendering from them)."""
        from ..reclassify.stages import label_depth

        sides = {(k, d): float(np.frombuffer(q, dtype=np.float32)[0])
                 for k, d, q in self.db.execute("SELECT key, detection, quality FROM evidence")}
        out: list[float] = []
        for key, text in self.db.execute("SELECT key, prediction FROM images ORDER BY key"):
            for idx, det in enumerate(json.loads(text).get("detections") or []):
                label = (det.get("processed_classification") or {}).get("class")
                if label and label_depth(label) < 5 and (key, idx) in sides:
                    out.append(sides[(key, idx)])
                    if len(out) >= limit:
                        return out
        return out

    def degraded_counts(self) -> dict[str, int]:
        """References with degraded views per label (the sampler resumes from these)."""
        rows = self.db.execute("SELECT label, COUNT(DISTINCT key || '#' || detection) FROM degraded"
                               " WHERE kind != 'background' GROUP BY label")
        return {label: int(n) for label, n in rows}

    def save_predictions(self, predictions: list[dict], root: Path) -> None:
        """Writes pass-2 results (the predictions with their reclassification objects) back, in one transaction."""
        root = Path(root).resolve()
        with self._transaction():
            for prediction in predictions:
                key = Path(prediction["filepath"]).relative_to(root).as_posix()
                body = {k: v for k, v in prediction.items() if k != "filepath"}
                self.db.execute("UPDATE images SET prediction = ? WHERE key = ?", (json.dumps(body), key))

    def merge(self, shard: Path) -> int:
        """Copies a chunk's shard (a store of some images) into this one in one transaction; idempotent."""
        self.db.execute("ATTACH DATABASE ? AS shard", (str(shard),))
        try:
            with self._transaction():
                keys = "SELECT key FROM shard.images"
                for table in ("embeddings", "evidence", "degraded"):
                    self.db.execute(f"DELETE FROM {table} WHERE key IN ({keys})")
                    self.db.execute(f"INSERT INTO {table} SELECT * FROM shard.{table}")
                self.db.execute("INSERT OR REPLACE INTO images SELECT * FROM shard.images")
                merged = self.db.execute("SELECT COUNT(*) FROM shard.images").fetchone()[0]
        finally:
            self.db.execute("DETACH DATABASE shard")
        return merged

    def count(self) -> int:
        """Number of images stored."""
        return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
